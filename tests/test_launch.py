"""Launch scripts (launch/): what they run, what they refuse, and how they stop.

Each script runs under bash with a PATH whose gcloud, srun, scontrol, python3 and curl are stubs:
every call is recorded, so a dry run can be checked to call nothing, and a real run can be checked
to call the right things (the stub trainers answer SIGTERM like the real one: exit 143). The
printed commands are parsed back with shlex, so quoting is checked along with the words. Nothing
here imports JAX or needs a GPU, a TPU, Slurm or gcloud.
"""

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_HOST = ROOT / "launch" / "gpu_host.sh"
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
CONFIG = "configs/hmar.py:tiny"
MESH = "--config.mesh.shape=(2,2,2)"  # an override the shell must quote: parentheses
SPACED = "--config.log.note=two words"  # and one with a space

# One stub for every command name (linked under each name). It records its name, the GPU variables
# it was started with and its arguments (NUL-separated, one file per call, named by time), then acts
# as the command would in the test.
STUB = r"""#!/bin/bash
name=$(basename "$0")
f="$STUB_DIR/calls/$(date +%s%N).$$"
printf '%s\0' "$name" "${CUDA_VISIBLE_DEVICES-<unset>}" "${JAX_LOCAL_DEVICE_IDS-<unset>}" "$@" >"$f.tmp"
mv "$f.tmp" "$f"
trainer() {  # waits to be stopped; SIGTERM: exit 143 as the trainer does after saving
  trap 'echo TERM >>"$STUB_DIR/term.$$"; kill $sleeper 2>/dev/null; exit 143' TERM
  sleep 30 &
  sleeper=$!
  echo $$ >"$STUB_DIR/running.$name.$$"
  wait $sleeper
}
ssh_session() {  # waits to be stopped; Ctrl-C ends it as it ends a real ssh session
  # The trap is set before the running file is written, so a SIGINT sent after the test sees that
  # file is never lost (bash ignores a SIGINT that a normally exiting child such as mv took).
  trap 'kill $sleeper 2>/dev/null; exit 130' INT
  sleep 30 &
  sleeper=$!
  echo $$ >"$STUB_DIR/running.$name.$$"
  wait $sleeper
}
case $name in
  gcloud)
    case " $* " in
      *" describe "*)
        [ -n "${STUB_DESCRIBE:-}" ] || { echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND" >&2; exit 1; }
        printf '%b\n' "$STUB_DESCRIBE" ;;
      *hmar_start*) [ "${STUB_BLOCK:-0}" != 1 ] || ssh_session ;;
      *" scp "*) cp "$5" "$STUB_DIR/scp.tgz" ;;  # compute tpus tpu-vm scp SOURCE ...
    esac ;;
  python3)
    if [ "$1" != -c ]; then trainer
    elif [ "${STUB_GPUS:-2}" = none ]; then printf 'Traceback\nModuleNotFoundError: no jax\n' >&2; exit 1
    else echo "${STUB_GPUS:-2}"; fi ;;
  srun)
    if [ "${STUB_BLOCK:-0}" = 1 ]; then trainer; fi ;;
  curl)
    case $* in
      *agent-worker-number*) [ -n "${STUB_WORKER:-}" ] && printf '%s' "$STUB_WORKER" || exit 22 ;;
      *worker-network-endpoints*) [ -n "${STUB_ENDPOINTS:-}" ] && printf '%s' "$STUB_ENDPOINTS" || exit 22 ;;
    esac ;;
esac
exit 0
"""
STUBBED = ("gcloud", "python3", "pip", "srun", "scontrol", "sbatch", "nvidia-smi", "curl")


@dataclass
class Call:
  name: str
  cuda_visible_devices: str
  jax_local_device_ids: str
  args: list[str]


class Stubs:
  """A bin folder of stubs, a HOME, and the calls recorded so far."""

  def __init__(self, tmp_path: Path):
    self.dir = tmp_path / "stubs"
    self.bin = self.dir / "bin"
    self.home = tmp_path / "home"
    for d in (self.bin, self.dir / "calls", self.home):
      d.mkdir(parents=True)
    stub = self.dir / "stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    for name in STUBBED:
      (self.bin / name).symlink_to(stub)

  def env(self, **extra) -> dict:
    """A bare environment: only the stubs and the system's tools on PATH, nothing inherited."""
    env = {
      "PATH": f"{self.bin}:/usr/bin:/bin",
      "HOME": str(self.home),
      "TMPDIR": str(self.dir),
      "LANG": "C.UTF-8",
      "STUB_DIR": str(self.dir),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env

  def calls(self) -> list[Call]:
    out = []
    for f in sorted((self.dir / "calls").iterdir(), key=lambda p: [int(x) for x in p.name.split(".")[:2]]):
      if f.suffix == ".tmp":
        continue
      name, cvd, ids, *args = f.read_bytes().decode().split("\0")[:-1]
      out.append(Call(name, cvd, ids, args))
    return out

  def running(self, name: str) -> list[int]:
    """Pids of the stub trainers (python3 or srun) waiting to be stopped."""
    return [int(p.read_text()) for p in self.dir.glob(f"running.{name}.*")]

  def terms(self, pid: int) -> int:
    """How many SIGTERMs the stub trainer `pid` received."""
    f = self.dir / f"term.{pid}"
    return len(f.read_text().split()) if f.exists() else 0


@pytest.fixture
def stubs(tmp_path):
  return Stubs(tmp_path)


def run(script: Path, *args: str, stubs: Stubs, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", str(script), *args], cwd=cwd, env=stubs.env(**env), capture_output=True, text=True, timeout=20
  )


def on_worker(stubs: Stubs, script: str, **env) -> subprocess.CompletedProcess:
  """Runs shell text meant for a TPU worker here, with the stubs' HOME as the worker's home."""
  return subprocess.run(["bash", "-c", script], env=stubs.env(**env), capture_output=True, text=True, timeout=20)


def _as_from_a_terminal():
  # A shell started with SIGINT ignored (as a test runner's worker, or anything started in the
  # background, may pass on) cannot trap it: give the script the disposition a terminal gives.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(script: Path, *args: str, stubs: Stubs, **env) -> subprocess.Popen:
  """Starts a script in a session of its own (a terminal's Ctrl-C reaches its whole group)."""
  return subprocess.Popen(
    ["bash", str(script), *args],
    cwd=ROOT,
    env=stubs.env(**env),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
    preexec_fn=_as_from_a_terminal,
  )


def wait_for(condition, timeout: float = 10.0):
  end = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < end, "timed out"
    time.sleep(0.02)


def commands(stdout: str) -> list[list[str]]:
  """The commands a script printed ('+ ' lines; a quoted word may span lines), as argument lists."""
  chunks = stdout.split("\n+ ")
  assert chunks[0].startswith("+ "), stdout
  chunks[0] = chunks[0][2:]
  return [shlex.split(c, comments=True) for c in chunks]


def one_error_line(result: subprocess.CompletedProcess) -> str:
  """The stderr of a refused input: exactly one 'error: ...' line, exit status 2."""
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


def train(*extra: str, config: str = CONFIG, workdir: str = "runs/x", python: str = "python3") -> list[str]:
  return [python, "-m", "hmar_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]


def explicit(coordinator: str, num_processes: int, process_id: int) -> list[str]:
  return [
    "--config.distributed.mode=explicit",
    f"--config.distributed.coordinator_address={coordinator}",
    f"--config.distributed.num_processes={num_processes}",
    f"--config.distributed.process_id={process_id}",
  ]


# ----------------------------------------------------------------------------- gpu_host.sh


def test_gpu_host_dry_run_prints_the_install_and_one_process_over_all_gpus_and_runs_nothing(stubs):
  result = run(GPU_HOST, "--dry-run", CONFIG, "runs/x", MESH, SPACED, stubs=stubs)
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert cmds[0][:4] == ["python3", "-m", "pip", "install"] and "jax[cuda13]" in cmds[0]
  assert cmds[-1] == train(MESH, SPACED)
  assert stubs.calls() == []


def test_gpu_host_dry_run_with_skip_install_prints_no_pip(stubs):
  result = run(GPU_HOST, "--dry-run", CONFIG, "runs/x", stubs=stubs, SKIP_INSTALL=1)
  assert result.returncode == 0, result.stderr
  assert not any("pip" in c for c in commands(result.stdout))


def test_gpu_host_with_two_processes_gives_each_its_gpu_and_process_id(stubs):
  result = run(GPU_HOST, "--dry-run", CONFIG, "runs/x", MESH, stubs=stubs, NPROC=2, GPUS=2, SKIP_INSTALL=1)
  assert result.returncode == 0, result.stderr
  assert commands(result.stdout)[-2:] == [
    ["env", f"CUDA_VISIBLE_DEVICES={i}", *train(*explicit("localhost:12355", 2, i), MESH)] for i in range(2)
  ]


def test_gpu_host_on_the_second_of_two_hosts_numbers_its_processes_after_the_first_hosts(stubs):
  env = dict(NNODES=2, NODE_RANK=1, MASTER_ADDR="node0", MASTER_PORT=23456, NPROC=2, GPUS=4, SKIP_INSTALL=1)
  result = run(GPU_HOST, "--dry-run", CONFIG, "runs/x", stubs=stubs, **env)
  assert result.returncode == 0, result.stderr
  assert commands(result.stdout)[-2:] == [
    ["env", f"CUDA_VISIBLE_DEVICES={gpus}", *train(*explicit("node0:23456", 4, 2 + i))]
    for i, gpus in enumerate(["0,1", "2,3"])
  ]


def test_gpu_host_shares_out_only_the_gpus_cuda_visible_devices_lists(stubs):
  env = dict(CUDA_VISIBLE_DEVICES="4,5,6,7", NPROC=2, SKIP_INSTALL=1)
  result = run(GPU_HOST, "--dry-run", CONFIG, "runs/x", stubs=stubs, **env)
  assert result.returncode == 0, result.stderr
  assert [c[1] for c in commands(result.stdout)[-2:]] == ["CUDA_VISIBLE_DEVICES=4,5", "CUDA_VISIBLE_DEVICES=6,7"]


def test_gpu_host_run_from_another_folder_passes_absolute_paths(stubs, tmp_path):
  result = run(GPU_HOST, "--dry-run", str(ROOT / CONFIG), "runs/x", stubs=stubs, cwd=tmp_path, SKIP_INSTALL=1)
  assert result.returncode == 0, result.stderr
  assert commands(result.stdout)[-1] == train(config=str(ROOT / CONFIG), workdir=str(tmp_path / "runs/x"))


def test_gpu_host_starts_each_process_on_its_gpu_and_passes_sigterm_to_all(stubs):
  proc = start(GPU_HOST, CONFIG, "runs/x", stubs=stubs, NPROC=2, SKIP_INSTALL=1, STUB_GPUS=2)
  wait_for(lambda: len(stubs.running("python3")) == 2)
  trainers = [c for c in stubs.calls() if c.args[:1] == ["-m"]]
  assert sorted(c.cuda_visible_devices for c in trainers) == ["0", "1"]
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=10)
  assert proc.returncode == 143
  assert [stubs.terms(pid) for pid in stubs.running("python3")] == [1, 1]


@pytest.mark.parametrize(
  "args, env, named",
  [
    ((), {}, "CONFIG and WORKDIR are required"),
    ((CONFIG,), {}, "CONFIG and WORKDIR are required"),
    (("configs/nope.py:tiny", "runs/x"), {}, "configs/nope.py"),
    ((CONFIG, "runs/x"), {"NPROC": "two"}, "NPROC"),
    ((CONFIG, "runs/x"), {"NPROC": "0"}, "NPROC"),
    ((CONFIG, "runs/x"), {"NPROC": "4", "GPUS": "2"}, "NPROC=4 but only 2 GPUs"),
    ((CONFIG, "runs/x"), {"NPROC": "3", "GPUS": "4"}, "NPROC=3 does not divide"),
    ((CONFIG, "runs/x"), {"NNODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR"),
    ((CONFIG, "runs/x"), {"NNODES": "2", "MASTER_ADDR": "node0"}, "NODE_RANK"),
    ((CONFIG, "runs/x"), {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0"}, "NODE_RANK=2"),
    ((CONFIG, "runs/x"), {"MASTER_PORT": "http"}, "MASTER_PORT"),
  ],
  ids=[
    "no-args",
    "no-workdir",
    "missing-config",
    "nproc-word",
    "nproc-zero",
    "nproc-over-gpus",
    "nproc-uneven",
    "no-master-addr",
    "no-node-rank",
    "rank-past-nodes",
    "bad-port",
  ],
)
def test_gpu_host_refuses_bad_input_in_one_line_before_running_anything(stubs, args, env, named):
  line = one_error_line(run(GPU_HOST, "--dry-run", *args, stubs=stubs, SKIP_INSTALL=1, **env))
  assert named in line
  assert stubs.calls() == []


def test_gpu_host_without_a_visible_gpu_stops_in_one_line_before_training(stubs):
  line = one_error_line(run(GPU_HOST, CONFIG, "runs/x", stubs=stubs, SKIP_INSTALL=1, STUB_GPUS=0))
  assert "no GPU visible" in line
  assert [c.args[:1] for c in stubs.calls()] == [["-c"]]


def test_gpu_host_without_jax_installed_stops_in_one_line_naming_the_error(stubs):
  line = one_error_line(run(GPU_HOST, CONFIG, "runs/x", stubs=stubs, SKIP_INSTALL=1, STUB_GPUS="none"))
  assert "could not count the GPUs" in line and "no jax" in line


# ----------------------------------------------------------------------------- slurm.sbatch


def test_slurm_dry_run_prints_one_srun_of_the_trainer_joining_the_job_by_itself(stubs):
  result = run(SLURM, CONFIG, "/shared/runs/x", MESH, SPACED, stubs=stubs, DRY_RUN=1)
  assert result.returncode == 0, result.stderr
  srun = [c for c in commands(result.stdout) if c[0] == "srun"]
  assert len(srun) == 1
  i = srun[0].index("python3")
  assert srun[0][i:] == train("--config.distributed.mode=auto", MESH, SPACED, workdir="/shared/runs/x")
  assert stubs.calls() == []


def test_slurm_takes_config_and_workdir_from_the_environment_and_overrides_from_arguments(stubs):
  result = run(SLURM, "--dry-run", MESH, stubs=stubs, CONFIG=CONFIG, WORKDIR="/shared/runs/y")
  assert result.returncode == 0, result.stderr
  srun = next(c for c in commands(result.stdout) if c[0] == "srun")
  assert srun[srun.index("python3") :] == train("--config.distributed.mode=auto", MESH, workdir="/shared/runs/y")


def test_slurm_asks_for_one_task_per_gpu_a_requeue_and_a_warning_before_the_time_limit():
  header = {}
  for line in SLURM.read_text().splitlines():
    if line.startswith("#SBATCH --"):
      key, _, value = line.split()[1][2:].partition("=")
      header[key] = value
  assert header["ntasks-per-node"] == header["gpus-per-node"]
  assert "requeue" in header
  sig, _, seconds = header["signal"].partition("@")
  assert sig == "B:USR1" and int(seconds) >= 60


def test_slurm_with_gpus_per_task_points_each_task_at_the_gpus_it_sees(stubs):
  env = dict(SLURM_JOB_ID=77, SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_PER_TASK=2)
  result = run(SLURM, CONFIG, "/shared/runs/x", stubs=stubs, **env)
  assert result.returncode == 0, result.stderr
  (srun,) = [c for c in stubs.calls() if c.name == "srun"]
  assert srun.jax_local_device_ids == "0,1"


def test_slurm_gives_each_task_the_cpus_the_job_asked_for_per_task(stubs):
  env = dict(SLURM_JOB_ID=77, SLURM_SUBMIT_DIR=ROOT, SLURM_CPUS_PER_TASK=12)
  result = run(SLURM, CONFIG, "/shared/runs/x", stubs=stubs, **env)
  assert result.returncode == 0, result.stderr
  (srun,) = [c for c in stubs.calls() if c.name == "srun"]
  assert "--cpus-per-task=12" in srun.args[: srun.args.index("python3")]


def test_slurm_near_the_time_limit_stops_the_tasks_with_sigterm_and_requeues_the_job(stubs):
  proc = start(SLURM, CONFIG, "/shared/runs/x", stubs=stubs, SLURM_JOB_ID=77, SLURM_SUBMIT_DIR=ROOT, STUB_BLOCK=1)
  wait_for(lambda: stubs.running("srun"))
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@... sends to the batch shell
  proc.communicate(timeout=10)
  assert proc.returncode == 143
  assert [stubs.terms(pid) for pid in stubs.running("srun")] == [1]
  assert [c.args for c in stubs.calls() if c.name == "scontrol"] == [["requeue", "77"]]


def test_slurm_on_preemption_waits_for_the_tasks_to_save_and_leaves_the_requeue_to_slurm(stubs):
  proc = start(SLURM, CONFIG, "/shared/runs/x", stubs=stubs, SLURM_JOB_ID=77, SLURM_SUBMIT_DIR=ROOT, STUB_BLOCK=1)
  wait_for(lambda: stubs.running("srun"))
  (srun,) = stubs.running("srun")
  proc.send_signal(signal.SIGTERM)  # Slurm signals the batch shell and the tasks
  time.sleep(0.3)
  assert proc.poll() is None and stubs.terms(srun) == 0  # the shell neither died nor signalled again
  os.kill(srun, signal.SIGTERM)
  proc.communicate(timeout=10)
  assert proc.returncode == 143
  assert [c for c in stubs.calls() if c.name == "scontrol"] == []


@pytest.mark.parametrize(
  "args, env, named",
  [
    ((), {}, "CONFIG is required"),
    ((CONFIG,), {}, "WORKDIR is missing"),
    ((MESH,), {"CONFIG": CONFIG}, "WORKDIR is required"),
    (("configs/nope.py", "/shared/runs/x"), {}, "configs/nope.py"),
    ((CONFIG, "/shared/runs/x"), {"DRY_RUN": "0"}, "not inside a Slurm job"),
    ((CONFIG, "/shared/runs/x"), {"DRY_RUN": "yes"}, "DRY_RUN must be 0 or 1"),
    ((CONFIG, "/shared/runs/x"), {"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "4"}, "ntasks-per-node=8"),
    ((CONFIG, "/shared/runs/x"), {"SLURM_GPUS_PER_TASK": "one"}, "SLURM_GPUS_PER_TASK"),
    ((CONFIG, "/shared/runs/x"), {"SLURM_SUBMIT_DIR": "/"}, "not the hmar_jax repository"),
  ],
  ids=[
    "no-config",
    "no-workdir-arg",
    "no-workdir-var",
    "missing-config",
    "outside-slurm",
    "bad-dry-run",
    "tasks-over-gpus",
    "bad-gpus-per-task",
    "not-the-repo",
  ],
)
def test_slurm_refuses_bad_input_in_one_line_before_running_anything(stubs, args, env, named):
  env = {"DRY_RUN": "1", **env}
  line = one_error_line(run(SLURM, *args, stubs=stubs, **env))
  assert named in line
  assert stubs.calls() == []


# ----------------------------------------------------------------------------- tpu_pod.sh

TPU = dict(TPU_NAME="pod", ZONE="us-east5-a", ACCELERATOR_TYPE="v5p-32")
TPU_WORKDIR = "/mnt/bucket/runs/x"


def gcloud_calls(cmds: list[list[str]]) -> list[list[str]]:
  return [c[4:] for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]


def remote(cmd: list[str]) -> str:
  """The shell text a `gcloud ... ssh --command=TEXT` runs on the workers."""
  return next(a for a in cmd if a.startswith("--command="))[len("--command=") :]


def test_tpu_dry_run_creates_copies_installs_and_starts_on_every_worker_and_calls_nothing(stubs):
  result = run(TPU_POD, "--dry-run", CONFIG, TPU_WORKDIR, MESH, stubs=stubs, **TPU)
  assert result.returncode == 0, result.stderr
  steps = gcloud_calls(commands(result.stdout))
  assert [s[0] for s in steps] == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  assert "--accelerator-type=v5p-32" in steps[1] and "--zone=us-east5-a" in steps[1]
  assert all("--worker=all" in s for s in steps[2:])
  assert "'jax[tpu]'" in remote(steps[4]) and "-e ~/hmar_jax_repo" in remote(steps[4])
  assert remote(steps[5]).splitlines()[-1].endswith(f"hmar_start {CONFIG} {TPU_WORKDIR} '' '' '{MESH}'")
  assert stubs.calls() == []


@pytest.mark.parametrize(
  "accelerator, runtime",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e"),
  ],
)
def test_tpu_creates_the_slice_with_the_documented_software_version_for_its_chip(stubs, accelerator, runtime):
  env = {**TPU, "ACCELERATOR_TYPE": accelerator}
  result = run(TPU_POD, "--dry-run", CONFIG, TPU_WORKDIR, stubs=stubs, **env)
  assert result.returncode == 0, result.stderr
  create = next(s for s in gcloud_calls(commands(result.stdout)) if s[0] == "create")
  assert f"--version={runtime}" in create


def test_tpu_passes_runtime_version_project_and_spot_to_gcloud(stubs):
  env = {**TPU, "RUNTIME_VERSION": "v2-alpha-custom", "PROJECT": "proj", "SPOT": 1}
  result = run(TPU_POD, "--dry-run", CONFIG, TPU_WORKDIR, stubs=stubs, **env)
  create = next(s for s in gcloud_calls(commands(result.stdout)) if s[0] == "create")
  assert {"--version=v2-alpha-custom", "--project=proj", "--spot"} <= set(create)


def test_tpu_with_skip_copy_and_skip_install_only_looks_up_and_starts(stubs):
  result = run(TPU_POD, "--dry-run", CONFIG, TPU_WORKDIR, stubs=stubs, SKIP_COPY=1, SKIP_INSTALL=1, **TPU)
  steps = gcloud_calls(commands(result.stdout))
  assert [s[0] for s in steps] == ["describe", "create", "ssh"] and "hmar_start" in remote(steps[2])


def test_tpu_names_the_config_by_its_path_inside_the_copied_repository(stubs, tmp_path):
  result = run(TPU_POD, "--dry-run", str(ROOT / CONFIG), TPU_WORKDIR, stubs=stubs, cwd=tmp_path, **TPU)
  assert result.returncode == 0, result.stderr
  start_cmd = gcloud_calls(commands(result.stdout))[-1]
  assert f"hmar_start {CONFIG} " in remote(start_cmd)


def test_tpu_reuses_a_ready_slice(stubs):
  result = run(
    TPU_POD, CONFIG, TPU_WORKDIR, stubs=stubs, SKIP_COPY=1, SKIP_INSTALL=1, STUB_DESCRIBE=r"READY\tv5p-32", **TPU
  )
  assert result.returncode == 0, result.stderr
  assert [c.args[3] for c in stubs.calls()] == ["describe", "ssh"]


def test_tpu_creates_a_missing_slice(stubs):
  result = run(TPU_POD, CONFIG, TPU_WORKDIR, stubs=stubs, SKIP_COPY=1, SKIP_INSTALL=1, **TPU)
  assert result.returncode == 0, result.stderr
  assert [c.args[3] for c in stubs.calls()] == ["describe", "create", "ssh"]


def test_tpu_deletes_and_recreates_a_preempted_slice(stubs):
  env = dict(SKIP_COPY=1, SKIP_INSTALL=1, STUB_DESCRIBE=r"PREEMPTED\tv5p-32", **TPU)
  result = run(TPU_POD, CONFIG, TPU_WORKDIR, stubs=stubs, **env)
  assert result.returncode == 0, result.stderr
  assert [c.args[3] for c in stubs.calls()] == ["describe", "delete", "create", "ssh"]


def test_tpu_refuses_a_ready_slice_of_another_type_in_one_line(stubs):
  env = dict(SKIP_COPY=1, SKIP_INSTALL=1, STUB_DESCRIBE=r"READY\tv4-8", **TPU)
  line = one_error_line(run(TPU_POD, CONFIG, TPU_WORKDIR, stubs=stubs, **env))
  assert "v4-8" in line and "v5p-32" in line
  assert [c.args[3] for c in stubs.calls()] == ["describe"]


def test_tpu_copies_the_repository_files_to_every_worker_and_unpacks_them_there(stubs):
  result = run(TPU_POD, CONFIG, TPU_WORKDIR, stubs=stubs, SKIP_INSTALL=1, STUB_DESCRIBE=r"READY\tv5p-32", **TPU)
  assert result.returncode == 0, result.stderr
  scp, unpack = [c.args for c in stubs.calls() if c.args[3] in ("scp", "ssh")][:2]
  assert scp[-3:] == ["pod:hmar_jax_repo.tgz", "--zone=us-east5-a", "--worker=all"]
  assert "--worker=all" in unpack
  # What a worker ends up with: the files git knows (ignored ones such as runs/ left out).
  (stubs.dir / "scp.tgz").rename(stubs.home / "hmar_jax_repo.tgz")
  (stubs.home / "hmar_jax_repo").mkdir()
  (stubs.home / "hmar_jax_repo" / "stale.txt").touch()
  assert on_worker(stubs, remote(unpack)).returncode == 0
  copied = {str(p.relative_to(stubs.home / "hmar_jax_repo")) for p in (stubs.home / "hmar_jax_repo").rglob("*")}
  assert {"hmar_jax/train.py", "launch/tpu_pod.sh", "requirements.txt"} <= copied
  assert not any(name.startswith("runs") for name in copied) and "stale.txt" not in copied


def test_tpu_ctrl_c_sends_sigterm_to_the_trainers_on_every_worker(stubs):
  env = dict(SKIP_COPY=1, SKIP_INSTALL=1, STUB_DESCRIBE=r"READY\tv5p-32", STUB_BLOCK=1, **TPU)
  proc = start(TPU_POD, CONFIG, TPU_WORKDIR, stubs=stubs, **env)
  wait_for(lambda: stubs.running("gcloud"))
  os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
  proc.communicate(timeout=10)
  assert proc.returncode == 130
  last = stubs.calls()[-1].args
  assert last[3:5] == ["ssh", "pod"] and "--worker=all" in last
  assert remote(last).endswith("; hmar_stop")


def test_tpu_stop_sends_sigterm_on_every_worker_without_a_config(stubs):
  result = run(TPU_POD, "--stop", stubs=stubs, TPU_NAME="pod", ZONE="us-east5-a")
  assert result.returncode == 0, result.stderr
  (call,) = stubs.calls()
  assert call.args[3:5] == ["ssh", "pod"] and "--worker=all" in call.args
  assert remote(call.args).endswith("; hmar_stop")


@pytest.mark.parametrize(
  "args, env, named",
  [
    ((CONFIG, TPU_WORKDIR), {"TPU_NAME": ""}, "TPU_NAME"),
    ((CONFIG, TPU_WORKDIR), {"ZONE": ""}, "ZONE"),
    ((CONFIG, TPU_WORKDIR), {"ACCELERATOR_TYPE": ""}, "set ACCELERATOR_TYPE"),
    ((CONFIG, TPU_WORKDIR), {"ACCELERATOR_TYPE": "v5p"}, "ACCELERATOR_TYPE must look like"),
    ((CONFIG, TPU_WORKDIR), {"ACCELERATOR_TYPE": "v9x-8"}, "RUNTIME_VERSION"),
    ((CONFIG,), {}, "CONFIG and WORKDIR are required"),
    (("configs/nope.py", TPU_WORKDIR), {}, "configs/nope.py"),
    (("/etc/hostname", TPU_WORKDIR), {}, "inside the repository"),
    ((CONFIG, "runs/x"), {}, "absolute path"),
    ((CONFIG, "gs://bucket/runs/x"), {}, "not a gs:// URL"),
    ((CONFIG, TPU_WORKDIR), {"SPOT": "yes"}, "SPOT"),
  ],
  ids=[
    "no-name",
    "no-zone",
    "no-accelerator",
    "bad-accelerator",
    "unknown-chip",
    "no-workdir",
    "missing-config",
    "config-outside-repo",
    "relative-workdir",
    "gs-workdir",
    "bad-spot",
  ],
)
def test_tpu_refuses_bad_input_in_one_line_before_running_anything(stubs, args, env, named):
  line = one_error_line(run(TPU_POD, "--dry-run", *args, stubs=stubs, **{**TPU, **env}))
  assert named in line
  assert stubs.calls() == []


def test_tpu_without_gcloud_installed_says_so_in_one_line(stubs, tmp_path):
  # The system's tools, less any gcloud installed there.
  system = tmp_path / "system"
  system.mkdir()
  for folder in ("/usr/bin", "/bin"):
    for entry in os.scandir(folder):
      if entry.name != "gcloud" and not (system / entry.name).exists():
        (system / entry.name).symlink_to(entry.path)
  (stubs.bin / "gcloud").unlink()
  line = one_error_line(run(TPU_POD, CONFIG, TPU_WORKDIR, stubs=stubs, PATH=f"{stubs.bin}:{system}", **TPU))
  assert "gcloud not found" in line


# -------------------------------------------------------- tpu_pod.sh, the part that runs on the workers


@pytest.fixture
def worker(stubs, tmp_path):
  """A worker's home: the repository copy, and a venv whose python records its arguments."""
  (stubs.home / "hmar_jax_repo").mkdir()
  bin_ = stubs.home / "hmar_jax_venv" / "bin"
  bin_.mkdir(parents=True)
  python = bin_ / "python"
  python.write_text("#!/bin/bash\nprintf '%s\\0' \"$@\" >\"$HOME/python.args\"\necho 'step 1: loss 4.2'\n")
  python.chmod(0o755)
  workdir = tmp_path / "shared" / "runs" / "x"
  workdir.parent.mkdir(parents=True)
  return workdir


def worker_script(stubs: Stubs, workdir: Path, *extra: str) -> str:
  result = run(TPU_POD, "--dry-run", CONFIG, str(workdir), *extra, stubs=stubs, SKIP_COPY=1, SKIP_INSTALL=1, **TPU)
  assert result.returncode == 0, result.stderr
  return remote(gcloud_calls(commands(result.stdout))[-1])


def trained_with(stubs: Stubs) -> list[str]:
  """The arguments the worker's python was started with (after the interpreter)."""
  return (stubs.home / "python.args").read_bytes().decode().split("\0")[:-1]


def test_a_pod_worker_joins_the_slice_explicitly_from_its_metadata(stubs, worker):
  script = worker_script(stubs, worker, MESH, SPACED)
  endpoints = "unknown:unknown:10.0.0.5,unknown:unknown:10.0.0.6"
  result = on_worker(stubs, script, STUB_WORKER=1, STUB_ENDPOINTS=endpoints)
  assert result.returncode == 0, result.stderr
  assert trained_with(stubs) == train(*explicit("10.0.0.5:8476", 2, 1), MESH, SPACED, workdir=str(worker))[1:]
  assert "step 1: loss 4.2" in (stubs.home / "hmar_jax_logs" / "worker-1.log").read_text()


def test_a_single_host_slice_trains_in_one_process_and_streams_its_output(stubs, worker):
  result = on_worker(stubs, worker_script(stubs, worker), STUB_WORKER=0, STUB_ENDPOINTS="unknown:unknown:10.0.0.5")
  assert result.returncode == 0, result.stderr
  assert trained_with(stubs) == train(workdir=str(worker))[1:]
  assert "step 1: loss 4.2" in result.stdout


def test_a_worker_refuses_to_start_a_second_trainer_in_one_line(stubs, worker):
  running = subprocess.Popen(["bash", "-c", "while :; do sleep 0.05; done", "hmar_jax.train"])
  try:
    (stubs.home / "hmar_jax_logs").mkdir()
    (stubs.home / "hmar_jax_logs" / "train.pid").write_text(f"{running.pid}\n")
    line = one_error_line(on_worker(stubs, worker_script(stubs, worker), STUB_WORKER=0))
    assert "training already" in line
    assert not (stubs.home / "python.args").exists()
  finally:
    running.kill()
    running.wait()


def test_a_worker_refuses_a_workdir_no_file_system_provides(stubs, worker):
  script = worker_script(stubs, Path("/mnt/not-mounted/runs/x"))
  line = one_error_line(on_worker(stubs, script, STUB_WORKER=0))
  assert "/mnt/not-mounted/runs" in line
  assert not (stubs.home / "python.args").exists()


def test_stopping_a_worker_sends_its_trainer_one_sigterm_and_waits_for_it_to_exit(stubs, tmp_path):
  result = run(TPU_POD, "--dry-run", "--stop", stubs=stubs, TPU_NAME="pod", ZONE="us-east5-a")
  script = remote(gcloud_calls(commands(result.stdout))[0])
  marker = tmp_path / "terms"
  trainer = subprocess.Popen(
    ["bash", "-c", f"trap 'echo TERM >>{marker}; exit 143' TERM; while :; do sleep 0.05; done", "hmar_jax.train"]
  )
  reaper = threading.Thread(target=trainer.wait)  # reaps it as soon as it exits, as init would
  reaper.start()
  try:
    (stubs.home / "hmar_jax_logs").mkdir()
    (stubs.home / "hmar_jax_logs" / "train.pid").write_text(f"{trainer.pid}\n")
    result = on_worker(stubs, script)
    assert result.returncode == 0, result.stderr
    assert trainer.poll() == 143
    assert marker.read_text().split() == ["TERM"]
  finally:
    trainer.kill()
    reaper.join()
