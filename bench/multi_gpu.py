"""The shared trainer on the GPUs of one host: every mesh and process layout against one GPU.

  python bench/multi_gpu.py --out bench/results/two_gpu.json                  # tiny model, 2+ GPUs
  python bench/multi_gpu.py --model d24 --budget 515 --out d24.json           # HMAR-d24, 768 per step
  python bench/multi_gpu.py --model d24 --layouts fsdp_2proc,tp_1proc \
      --reference d24.json --budget 515 --out d24_b.json                      # the rest, in a second call
  python bench/multi_gpu.py --platform cpu --out /tmp/mg.json                 # the logic on CPU
  python bench/multi_gpu.py --model d24 --dry-run                             # print the commands

Each layout is its own run of `python -m hmar_jax.train` (the 2-process layouts through
launch/gpu_host.sh with NPROC=2; on CPU, where that script finds no GPU, the same two commands are
started directly, one simulated device per process). Layouts: 1gpu (mesh (1,1,1)), and on two GPUs
data parallel (2,1,1), FSDP (1,2,1) and tensor parallel (1,1,2), each in one process (*_1proc) and in
two (*_2proc). Every
run trains the same steps on the same data; the first steps' losses are compared with the one-GPU
run's (the layouts differ only in reduction order, so they agree to bf16 rounding). --reference
takes the one-GPU row from an earlier output, so a sweep can be split over several calls.

Models (--model):
  tiny  a small HMAR (depth 4, width 256, 4 heads of 64, the tiny 32 px tokenizer, scanned blocks,
        bf16 compute with f32 parameters), global batch 32 without accumulation, 6 steps.
  d24   configs/hmar.py:d24 (the official recipe: 256 px, bf16, scanned blocks, 'dots' remat, the
        Triton attention kernels under shard_map), the official global batch 768 by gradient
        accumulation (train.grad_accum_steps) in micro-batches of --micro (32) per data shard: 24 on
        one GPU, 12 per GPU with data parallel or FSDP, 24 with tensor parallel (both GPUs share each
        micro-batch). 3 steps: the first compiles, the other two are timed.
With accumulation (--micro > 0) class dropout and drop path are off (--dropout keeps them): their
random draws are taken per micro-batch, so runs with different accumulation counts would draw
different ones and their losses would not be comparable.

Data: procedural images (built in), at least one global batch of them. They are tokenised once,
before the layouts, by a random tokenizer of the model's architecture saved as a checkpoint (a
separate process, GPU 0): every layout loads that checkpoint and finds the token cache ready (the
cache is keyed on the tokenizer's bytes and the data settings, which all layouts share).

Per layout: images/s and MFU over the timed steps (the trainer's metrics.jsonl rows, one per step),
per-GPU peak memory (the allocator's peak_bytes_in_use, read inside each training process by a
`sitecustomize` hook that this script puts on PYTHONPATH: the trainer does not log it), seconds
from launch to the first step's metrics row (imports, tokenizer, sharded init, compile, one step;
for the 2-process layouts also launch/gpu_host.sh's GPU count), the losses, the largest relative
loss difference against one GPU, and scaling = images/s / (GPUs x one GPU's images/s). With
--stop-after-last-step (the default for d24) a run is killed once its last step is logged: the
end-of-run checkpoint (12 GB for d24) and final parameters are not what this measures.

JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, default WORKDIR/jax_cache) is shared
by the runs: on GPU its key leaves out the device assignment, so a 2-process layout can load the
programs its 1-process twin compiled (run the twin first; compile_cache_files_added in each row
shows what was compiled). Each layout has a hard time limit (--timeout) and the whole sweep an optional one (--budget):
a failure, timeout or skipped layout is recorded in the JSON, written after every layout, and the
sweep goes on.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import glob
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from hmar_jax import config_utils  # noqa: E402
from hmar_jax.parallel import check_divisible  # noqa: E402
from hmar_jax.tokenizer import vqvae as vqvae_lib  # noqa: E402
from hmar_jax.training import schema, token_cache  # noqa: E402

# name: (processes, mesh (data, fsdp, tensor), GPUs)
LAYOUTS = {
  "1gpu": (1, (1, 1, 1), 1),
  "dp_1proc": (1, (2, 1, 1), 2),
  "dp_2proc": (2, (2, 1, 1), 2),
  "fsdp_1proc": (1, (1, 2, 1), 2),
  "fsdp_2proc": (2, (1, 2, 1), 2),
  "tp_1proc": (1, (1, 1, 2), 2),
  "tp_2proc": (2, (1, 1, 2), 2),
}
# Default sweeps.
TINY_LAYOUTS = ("1gpu", "dp_1proc", "fsdp_1proc", "tp_1proc", "dp_2proc", "fsdp_2proc", "tp_2proc")
D24_LAYOUTS = ("1gpu", "dp_1proc", "dp_2proc", "fsdp_1proc", "fsdp_2proc", "tp_1proc", "tp_2proc")

# Per model: config file, settings every layout shares, and the defaults of the command line.
MODELS = {
  "tiny": {
    "config": "configs/hmar.py:tiny",
    "settings": {
      "model.width": 256,
      "model.num_heads": 4,
      "model.dtype": "bfloat16",
      "model.scan_layers": True,
      "data.num_examples": 512,
    },
    "batch": 32,
    "micro": 0,
    "steps": 6,
    "timeout": 180,
    "attn": "auto",
    "stop_after_last_step": False,
  },
  "d24": {
    "config": "configs/hmar.py:d24",
    "settings": {
      "data.source": "procedural",
      "data.num_classes": 10,
    },
    "batch": 768,
    "micro": 32,
    "steps": 3,
    "timeout": 180,
    "attn": "triton",
    "stop_after_last_step": True,
  },
}
COMMON_SETTINGS = {
  "optim.schedule": "constant",  # the same learning rate whatever num_steps is
  "log.every_steps": 1,
  "log.tensorboard": False,
  "sample.grid_at_end": False,
}
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "jax-triton", "triton", "flax", "optax")
PACKAGES += ("orbax-checkpoint", "grain", "ml-collections", "numpy")
MEMORY_ENV = "HMAR_BENCH_MEMORY_DIR"

# Put on PYTHONPATH of the training processes (as sitecustomize.py, which Python imports at start-up):
# once the trainer has initialised JAX's backends, it writes this process's devices' memory stats to
# $HMAR_BENCH_MEMORY_DIR/memory-PID.json every half second and at exit (its exit handler is registered
# after JAX's, so it runs before JAX tears the backends down). It never initialises a backend itself
# (that would race jax.distributed.initialize), and never lets an error reach the trainer.
MEMORY_HOOK = '''"""Written by bench/multi_gpu.py: device memory stats of a training process (see there)."""
import atexit, json, os, sys, threading, time


def _chain():  # run the sitecustomize this file hides, if any
  here = os.path.dirname(os.path.abspath(__file__))
  for entry in sys.path:
    path = os.path.join(os.path.abspath(entry or os.curdir), "sitecustomize.py")
    if os.path.dirname(path) != here and os.path.isfile(path):
      with open(path) as f:
        exec(compile(f.read(), path, "exec"), {"__name__": "sitecustomize", "__file__": path})
      return


def _snapshot(directory):
  try:
    import jax
    rows = []
    for d in jax.local_devices():
      s = d.memory_stats() or {}
      rows.append({"id": d.id, "kind": d.device_kind, "peak_bytes_in_use": s.get("peak_bytes_in_use"),
                   "bytes_limit": s.get("bytes_limit")})
    out = {"pid": os.getpid(), "process_index": jax.process_index(), "devices": rows, "time": time.time()}
    path = os.path.join(directory, "memory-%d.json" % os.getpid())
    with open(path + ".tmp", "w") as f:
      json.dump(out, f)
    os.replace(path + ".tmp", path)
  except Exception:
    pass


def _watch(directory):
  registered = False
  while True:
    time.sleep(0.5)
    try:
      xb = sys.modules.get("jax._src.xla_bridge")
      if "hmar_jax.training.trainer" not in sys.modules or xb is None:
        continue
      ready = getattr(xb, "backends_are_initialized", None)
      if not (ready() if ready is not None else getattr(xb, "_backends", None)):
        continue
      if not registered:
        atexit.register(_snapshot, directory)
        registered = True
      _snapshot(directory)
    except Exception:
      pass


try:
  _chain()
finally:
  if os.environ.get("HMAR_BENCH_MEMORY_DIR"):
    threading.Thread(target=_watch, args=(os.environ["HMAR_BENCH_MEMORY_DIR"],), daemon=True).start()
'''


# ----------------------------------------------------------------------------- settings


def layout_settings(a, name: str, workdir: str) -> dict:
  """Every config field the layout's run sets (dotted key -> value), beyond the config file's."""
  model = MODELS[a.model]
  procs, mesh, _ = LAYOUTS[name]
  shards = mesh[0] * mesh[1]
  accum = a.batch // (a.micro * shards) if a.micro else 1
  s = dict(COMMON_SETTINGS, **model["settings"])
  s.update(
    {
      "mesh.shape": mesh,
      "train.batch_size": a.batch,
      "train.num_steps": a.steps,
      "train.grad_accum_steps": accum,
      "data.num_examples": max(a.batch, s.get("data.num_examples", 0)),
      "data.tokens_cache": os.path.join(workdir, "tokens"),
      "tokenizer.checkpoint": os.path.join(workdir, "tokenizer"),
      "model.attn_implementation": a.attn,
    }
  )
  if a.micro and not a.dropout:  # see the module docstring
    s.update({"model.cond_drop_rate": 0.0, "model.drop_path_rate": 0.0})
  return s


def cli_value(v) -> str:
  """A value as `--config.a.b=` takes it."""
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(str(x) for x in v) + ")"
  return repr(v) if isinstance(v, float) else str(v)


def build_config(spec: str, settings: dict):
  file, _, variant = spec.partition(":")
  config = config_utils.load_config_file(os.path.join(ROOT, file) + (f":{variant}" if variant else ""))
  return schema.apply_overrides(config, settings)


def check_layouts(a, names: list[str], workdir: str) -> None:
  """Each layout's config as the trainer will check it, before any run (raises ValueError)."""
  for name in names:
    procs, mesh, gpus = LAYOUTS[name]
    shards = mesh[0] * mesh[1]
    if a.micro and a.batch % (a.micro * shards):
      raise ValueError(
        f"layout {name}: the global batch {a.batch} is not a whole number of micro-batches of {a.micro} "
        f"per data shard (mesh data x fsdp = {shards})"
      )
    settings = dict(layout_settings(a, name, workdir), **{"tokenizer.checkpoint": ""})  # not written yet
    config = build_config(MODELS[a.model]["config"], settings)
    schema.validate(config, num_devices=gpus)
    accum = config.train.grad_accum_steps
    check_divisible(
      a.batch // accum, config.model.num_heads, dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)), name
    )
    if a.batch % procs:
      raise ValueError(f"layout {name}: the global batch {a.batch} is not divisible by its {procs} processes")


# ----------------------------------------------------------------------------- the token cache


def prepare(spec: str, settings: dict) -> None:
  """(Child process.) Saves a random tokenizer of the config's architecture to the settings'
  tokenizer.checkpoint and tokenises the training images with it (loaded back from there, as the
  layouts load it) into data.tokens_cache; prints one PREPARED {json} line."""
  t0 = time.time()
  ckpt = settings["tokenizer.checkpoint"]
  random_init = build_config(spec, dict(settings, **{"tokenizer.checkpoint": ""}))
  vqvae_lib.save_vqvae(ckpt, token_cache.load_tokenizer(random_init))
  config = build_config(spec, settings)
  vqvae = token_cache.load_tokenizer(config)
  cache = token_cache.cached_tokens(config, os.path.dirname(ckpt), vqvae)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(vqvae, nnx.Param)))
  info = {
    "seconds": round(time.time() - t0, 1),
    "images": len(cache),
    "image_size": int(vqvae.image_size),
    "tokenizer_params": int(params),
    "device_kind": jax.devices()[0].device_kind,
    "platform": jax.devices()[0].platform,
  }
  print("PREPARED " + json.dumps(info), flush=True)


def run_prepare(a, settings: dict, env: dict, log_dir: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--prepare-child", json.dumps(settings), "--model", a.model]
  env = dict(env, CUDA_VISIBLE_DEVICES="0")
  t0 = time.time()
  with open(os.path.join(log_dir, "prepare.log"), "w") as log:
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=a.timeout)
      code, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired:
      code, out = "timeout", ""
  lines = [line for line in out.splitlines() if line.startswith("PREPARED ")]
  info = json.loads(lines[-1][len("PREPARED ") :]) if lines else {}
  info.update(exit=code, wall_s=round(time.time() - t0, 1))
  if code != 0 or not lines:
    info["error"] = _log_tail(os.path.join(log_dir, "prepare.log"))
  return info


# ----------------------------------------------------------------------------- one layout


def _log_tail(path: str, chars: int = 1500) -> str:
  try:
    with open(path, errors="replace") as f:
      text = f.read().replace("\r", "\n")
  except OSError:
    return ""
  return text[-chars:]


def read_metrics(path: str) -> list[dict]:
  """metrics.jsonl rows written so far (a half-written last line is left out)."""
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          break
  except OSError:
    pass
  return rows


def device_env(base: dict, platform: str, devices: int, visible: str) -> dict:
  """The environment of a training process that must see `devices` devices."""
  env = dict(base)
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = visible
  else:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def layout_commands(a, name: str, run_dir: str, settings: dict, env: dict, port: int) -> list[tuple[list, dict]]:
  """[(argv, env)] of the layout's processes: one command (python, or launch/gpu_host.sh on GPU for
  two processes), or on CPU two python commands as launch/gpu_host.sh would start them."""
  procs, _, gpus = LAYOUTS[name]
  spec = MODELS[a.model]["config"]
  overrides = [f"--config.{k}={cli_value(v)}" for k, v in settings.items()]
  train = [sys.executable, "-m", "hmar_jax.train", f"--config={spec}", f"--workdir={run_dir}"]
  visible = ",".join(str(i) for i in range(gpus))
  if procs == 1:
    return [(train + overrides, device_env(env, a.platform, gpus, visible))]
  if a.platform == "gpu":
    launcher_env = dict(env, NPROC=str(procs), SKIP_INSTALL="1", MASTER_PORT=str(port), PYTHON=sys.executable)
    return [
      (["bash", "launch/gpu_host.sh", spec, run_dir, *overrides], dict(launcher_env, CUDA_VISIBLE_DEVICES=visible))
    ]
  out = []
  for i in range(procs):
    dist = [
      "--config.distributed.mode=explicit",
      f"--config.distributed.coordinator_address=localhost:{port}",
      f"--config.distributed.num_processes={procs}",
      f"--config.distributed.process_id={i}",
    ]
    out.append((train + dist + overrides, device_env(env, "cpu", gpus // procs, str(i))))
  return out


def _group_alive(pgid: int) -> bool:
  """True while a process of group `pgid` runs (zombies, which hold no GPU memory, do not count:
  a container's init may never reap the orphans)."""
  if not os.path.isdir("/proc"):
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return False
    return True
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after '(command)': state, ppid, pgrp, ...
    except (OSError, IndexError):
      continue
    if int(fields[2]) == pgid and fields[0] not in "ZX":
      return True
  return False


def _stop_group(pgid: int, procs: list) -> None:
  """SIGKILL to the layout's process group (the processes this script started and their children),
  then waits until none is left, so that the next layout finds the GPUs free."""
  with contextlib.suppress(ProcessLookupError):
    os.killpg(pgid, signal.SIGKILL)
  for p in procs:
    p.wait()
  deadline = time.time() + 20
  while _group_alive(pgid) and time.time() < deadline:
    time.sleep(0.1)


def supervise(commands, log_path: str, metrics_path: str, steps: int, timeout: float, stop_after_last: bool) -> dict:
  """Starts the commands in one new process group and watches metrics.jsonl until they end, the last
  step is logged (with stop_after_last: then they are killed) or `timeout` seconds pass."""
  out = {}
  t0 = time.time()
  procs = []
  with open(log_path, "w") as log:
    try:
      for argv, env in commands:
        group = 0 if not procs else procs[0].pid  # all in the first one's new group
        procs.append(
          subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=group)
        )
      while True:
        rows = read_metrics(metrics_path)
        now = time.time()
        if rows and "first_step_s" not in out:
          out["first_step_s"] = round(now - t0, 1)
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
          out["exit"] = next((c for c in codes if c), 0)
          out["ended"] = "finished" if not out["exit"] else "failed"
          break
        if stop_after_last and len(rows) >= steps:
          time.sleep(1.2)  # the memory hook writes every 0.5 s: one more snapshot after the last step
          out["exit"], out["ended"] = None, "stopped after the last step"
          break
        if now - t0 > timeout:
          out["exit"], out["ended"] = "timeout", f"killed after {timeout:.0f} s"
          break
        time.sleep(0.2)
    finally:
      if procs:
        _stop_group(procs[0].pid, procs)
  out["seconds"] = round(time.time() - t0, 1)
  return out


def _harmonic(values: list[float]) -> float | None:
  """The rate over all the steps together (each step does the same work): n / sum(1 / rate)."""
  values = [v for v in values if v]
  return len(values) / sum(1.0 / v for v in values) if values else None


def read_memory(directory: str) -> list[dict]:
  """Per device, process by process: the hook's last snapshot (peak and limit in GiB)."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "memory-*.json"))):
    try:
      with open(path) as f:
        snap = json.load(f)
    except (OSError, ValueError):
      continue
    for d in snap["devices"]:
      peak, limit = d.get("peak_bytes_in_use"), d.get("bytes_limit")
      out.append(
        {
          "process": snap["process_index"],
          "device": d["id"],
          "peak_gib": None if peak is None else round(peak / 2**30, 2),
          "limit_gib": None if limit is None else round(limit / 2**30, 2),
        }
      )
  return sorted(out, key=lambda r: (r["process"], r["device"]))


def _mtime(path: str) -> int | None:
  try:
    return os.stat(path).st_mtime_ns
  except OSError:
    return None


def _count_files(directory: str | None) -> int | None:
  if not directory or not os.path.isdir(directory):
    return None
  return sum(len(files) for _, _, files in os.walk(directory))


def run_layout(a, name: str, index: int, env: dict, log_dir: str, timeout: float) -> dict:
  procs, mesh, gpus = LAYOUTS[name]
  run_dir = os.path.join(a.workdir, name)
  memory_dir = os.path.join(run_dir, "memory")
  os.makedirs(memory_dir)
  settings = layout_settings(a, name, a.workdir)
  env = dict(env, **{MEMORY_ENV: memory_dir})
  commands = layout_commands(a, name, run_dir, settings, env, a.port + index)
  row = {
    "layout": name,
    "processes": procs,
    "mesh": list(mesh),
    "gpus": gpus,
    "grad_accum_steps": settings["train.grad_accum_steps"],
    "micro_batch_per_data_shard": a.batch // settings["train.grad_accum_steps"] // (mesh[0] * mesh[1]),
    "launcher": "launch/gpu_host.sh" if procs > 1 and a.platform == "gpu" else "python -m hmar_jax.train",
  }
  manifest = os.path.join(a.workdir, "tokens", token_cache.MANIFEST)
  manifest_before, cache_before = _mtime(manifest), _count_files(env.get("JAX_COMPILATION_CACHE_DIR"))
  log_path = os.path.join(log_dir, f"{name}.log")
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  row.update(supervise(commands, log_path, metrics_path, a.steps, timeout, a.stop_after_last_step))
  rows = read_metrics(metrics_path)
  if os.path.exists(metrics_path):
    shutil.copy(metrics_path, os.path.join(log_dir, f"{name}.metrics.jsonl"))
  if rows:
    row["losses"] = [r["loss"] for r in rows]
    row["img_s_per_step"] = [None if "img_s" not in r else round(r["img_s"], 2) for r in rows]
    timed = [r for r in rows if "img_s" in r]
    for key, out_key, digits in (("img_s", "img_s", 2), ("mfu", "mfu", 4), ("tflops_per_device", "tflops_per_gpu", 1)):
      rate = _harmonic([r.get(key) for r in timed])
      row[out_key] = None if rate is None else round(rate, digits)
    row["timed_steps"] = len(timed)
  row["peak_memory"] = read_memory(memory_dir)
  row["peak_gib_per_gpu"] = [m["peak_gib"] for m in row["peak_memory"]]
  row["retokenised"] = _mtime(manifest) != manifest_before
  cache_after = _count_files(env.get("JAX_COMPILATION_CACHE_DIR"))
  if cache_before is not None and cache_after is not None:
    row["compile_cache_files_added"] = cache_after - cache_before
  complete = len(rows) >= a.steps
  if not complete or row["ended"] == "failed":
    tail = _log_tail(log_path)
    oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
    row["error"] = f"out of memory; {row['ended']}" if oom else f"{row['ended']}, {len(rows)} of {a.steps} steps"
    row["log_tail"] = tail
  shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints (12 GB for d24); the metrics were copied
  return row


# ----------------------------------------------------------------------------- the sweep


def detect_platform() -> str:
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu" or not shutil.which("nvidia-smi"):
    return "cpu"
  try:
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return "cpu"
  return "gpu" if "GPU" in listed else "cpu"


def describe_device(platform: str) -> str:
  if platform != "gpu":
    return f"CPU ({os.cpu_count()} cores), each process with as many simulated devices as its layout uses"
  query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
  names = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
  return f"{len(names)} x {names[0]} (one host)" if names else "GPU"


def versions() -> dict:
  out = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      out[name] = importlib.metadata.version(name)
  return out


def add_comparisons(rows: list[dict], ref: dict | None) -> None:
  """Max relative loss difference and scaling of every row against the one-GPU row `ref`."""
  if not ref or not ref.get("losses"):
    return
  for r in rows:
    if r.get("losses"):
      n = min(len(r["losses"]), len(ref["losses"]))
      pairs = list(zip(r["losses"][:n], ref["losses"][:n], strict=True))
      r["max_rel_diff_vs_1gpu"] = max(abs(x - y) / abs(y) for x, y in pairs)
      r["steps_compared"] = n
    if r.get("img_s") and ref.get("img_s"):
      r["scaling_vs_1gpu"] = round(r["img_s"] / (r["gpus"] * ref["img_s"]), 3)


def table(rows: list[dict]) -> str:
  head = (
    f"{'layout':10} {'procs':>5} {'mesh':7} {'accum':>5} {'end':>7} {'first_s':>7} {'img/s':>8} {'MFU':>6} "
    f"{'peak GiB/GPU':>13} {'rel diff':>8} {'scaling':>7}"
  )
  lines = [head]

  def f(v, spec):
    return "-" if v is None else format(v, spec)

  ends = {"finished": "ok", "stopped after the last step": "ok/stop", "skipped": "skip"}
  for r in rows:
    end = ends.get(r.get("ended"), str(r.get("exit", "error")))
    peaks = "/".join("-" if p is None else f"{p:.1f}" for p in r.get("peak_gib_per_gpu", [])) or "-"
    lines.append(
      f"{r['layout']:10} {r['processes']:>5} {','.join(map(str, r['mesh'])):7} {r.get('grad_accum_steps', 0):>5} "
      f"{end:>7} {f(r.get('first_step_s'), '.1f'):>7} {f(r.get('img_s'), '.1f'):>8} {f(r.get('mfu'), '.3f'):>6} "
      f"{peaks:>13} {f(r.get('max_rel_diff_vs_1gpu'), '.1e'):>8} {f(r.get('scaling_vs_1gpu'), '.3f'):>7}"
    )
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=tuple(MODELS), default="tiny")
  p.add_argument("--layouts", default=None, help=f"comma-separated, of {', '.join(LAYOUTS)} (default: per model)")
  p.add_argument("--steps", type=int, default=None, help="steps per run (the first compiles; default: per model)")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: tiny 32, d24 768)")
  p.add_argument("--micro", type=int, default=None, help="micro-batch per data shard; 0: no accumulation")
  p.add_argument("--attn", default=None, help="model.attn_implementation (default: tiny auto, d24 triton)")
  p.add_argument("--dropout", action="store_true", help="keep class dropout and drop path when accumulating")
  p.add_argument("--stop-after-last-step", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--timeout", type=int, default=None, help="seconds per layout (and for the tokenising)")
  p.add_argument("--budget", type=int, default=0, help="seconds for the whole sweep (0: no limit)")
  p.add_argument("--platform", choices=("auto", "gpu", "cpu"), default="auto")
  p.add_argument("--compile-cache", default=None, help="JAX_COMPILATION_CACHE_DIR (default WORKDIR/jax_cache)")
  p.add_argument("--reference", default=None, help="an earlier --out whose 1gpu row the losses are compared with")
  p.add_argument("--port", type=int, default=12411, help="coordinator port of the first 2-process layout")
  p.add_argument("--workdir", default="/tmp/multi_gpu")
  p.add_argument("--out", default=None)
  p.add_argument("--logs", default=None, help="folder for each run's log (default: beside --out)")
  p.add_argument("--dry-run", action="store_true", help="print each layout's commands, run nothing")
  p.add_argument("--prepare-child", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  model = MODELS[a.model]
  for key in ("steps", "batch", "micro", "attn", "timeout", "stop_after_last_step"):
    if getattr(a, key) is None:
      setattr(a, key, model[key])
  if a.prepare_child is not None:
    return a
  if not a.out and not a.dry_run:
    p.error("--out is required")
  a.layouts = a.layouts.split(",") if a.layouts else list(D24_LAYOUTS if a.model == "d24" else TINY_LAYOUTS)
  unknown = [n for n in a.layouts if n not in LAYOUTS]
  if unknown:
    p.error(f"unknown layouts {unknown}; valid: {', '.join(LAYOUTS)}")
  if a.steps < 2:
    p.error(f"--steps must be >= 2 (the first step compiles and is not timed), got {a.steps}")
  if a.batch < 1 or a.micro < 0 or a.timeout < 1 or a.budget < 0:
    p.error("--batch and --timeout must be positive, --micro and --budget >= 0")
  a.platform = detect_platform() if a.platform == "auto" else a.platform
  a.workdir = os.path.abspath(a.workdir)
  try:
    check_layouts(a, a.layouts, a.workdir)
  except ValueError as e:
    p.error(str(e))
  a.reference_row = None
  if a.reference:
    try:
      with open(a.reference) as f:
        earlier = json.load(f)
    except (OSError, ValueError) as e:
      p.error(f"--reference {a.reference}: {e}")
    same = {k: earlier.get("settings", {}).get(k) for k in ("model", "batch", "micro", "steps", "dropout")}
    mine = {"model": a.model, "batch": a.batch, "micro": a.micro, "steps": a.steps, "dropout": a.dropout}
    if same != mine:
      p.error(f"--reference {a.reference} ran other settings: {same}, this run: {mine}")
    a.reference_row = next((r for r in earlier.get("rows", []) if r["layout"] == "1gpu" and r.get("losses")), None)
    if a.reference_row is None:
      p.error(f"--reference {a.reference} has no 1gpu row with losses")
  return a


def main(argv=None):
  a = parse_args(argv)
  if a.prepare_child is not None:
    prepare(MODELS[a.model]["config"], json.loads(a.prepare_child))
    return
  base_env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
  if a.compile_cache != "":
    base_env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(
      a.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(a.workdir, "jax_cache")
    )
  hook_dir = os.path.join(a.workdir, "hook")
  base_env["PYTHONPATH"] = os.pathsep.join(p for p in (hook_dir, ROOT, os.environ.get("PYTHONPATH")) if p)
  if a.dry_run:
    for i, name in enumerate(a.layouts):
      print(f"# {name}")
      for argv, env in layout_commands(
        a, name, os.path.join(a.workdir, name), layout_settings(a, name, a.workdir), base_env, a.port + i
      ):
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        print(" ".join(f"{k}={v}" for k, v in sorted(changed.items())), " ".join(argv))
    return
  t_start = time.time()
  deadline = t_start + a.budget if a.budget else None
  shutil.rmtree(a.workdir, ignore_errors=True)
  os.makedirs(hook_dir)
  with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
    f.write(MEMORY_HOOK)
  log_dir = a.logs or os.path.dirname(os.path.abspath(a.out))
  os.makedirs(log_dir, exist_ok=True)
  report = {
    "what": "bench/multi_gpu.py: the shared trainer on 2 GPUs, each layout's throughput, memory and losses vs one GPU",
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device": describe_device(a.platform),
    "platform": a.platform,
    "versions": versions(),
    "settings": {
      "model": a.model,
      "config": MODELS[a.model]["config"],
      "batch": a.batch,
      "micro": a.micro,
      "steps": a.steps,
      "attn": a.attn,
      "dropout": a.dropout,
      "stop_after_last_step": a.stop_after_last_step,
      "timeout_s": a.timeout,
      "budget_s": a.budget,
      "compile_cache": base_env.get("JAX_COMPILATION_CACHE_DIR"),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "overrides_of_1gpu": {k: cli_value(v) for k, v in layout_settings(a, "1gpu", a.workdir).items()},
    },
    "reference": a.reference or "the 1gpu row of this run",
    "rows": [],
  }

  def write():
    with open(a.out, "w") as f:
      json.dump(report, f, indent=1)

  atexit.register(write)  # also when interrupted: what was measured so far
  report["prepare"] = run_prepare(
    a, layout_settings(a, "1gpu", a.workdir), device_env(base_env, a.platform, 1, "0"), log_dir
  )
  print("prepare: " + json.dumps(report["prepare"])[:400], flush=True)
  if report["prepare"].get("error"):
    write()
    sys.exit(f"error: tokenising failed (see {os.path.join(log_dir, 'prepare.log')})")
  rows = report["rows"]
  for i, name in enumerate(a.layouts):
    timeout = float(a.timeout)
    if deadline is not None:
      timeout = min(timeout, deadline - time.time() - 5)
    if timeout < 20:
      procs, mesh, gpus = LAYOUTS[name]
      rows.append(
        {"layout": name, "processes": procs, "mesh": list(mesh), "gpus": gpus, "ended": "skipped", "error": "budget"}
      )
    else:
      try:
        rows.append(run_layout(a, name, i, base_env, log_dir, timeout))
      except Exception as e:  # a launch that failed outright: recorded, and the sweep goes on
        procs, mesh, gpus = LAYOUTS[name]
        rows.append({"layout": name, "processes": procs, "mesh": list(mesh), "gpus": gpus, "error": repr(e)})
    add_comparisons(rows, a.reference_row or next((r for r in rows if r["layout"] == "1gpu" and r.get("losses")), None))
    report["total_s"] = round(time.time() - t_start, 1)
    write()
    print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("log_tail", "peak_memory")}), flush=True)
  print(f"\nwrote {a.out}; losses by step:")
  for r in rows:
    print(f"  {r['layout']:10} {[round(x, 5) for x in r.get('losses', [])]}")
  print(table(rows), flush=True)


if __name__ == "__main__":
  main()
