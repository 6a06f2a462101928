"""Two JAX processes on one machine (jax.distributed, localhost coordinator) train as one.

Each process has 2 virtual CPU devices; the (2, 2, 1) mesh spans both processes, and each process
reads its own half of every batch. The losses equal those of one process holding all 4 devices,
the two processes save a checkpoint together and resume from it, and only process 0 writes the
metrics and final parameters. The single-process reference runs in the test process itself. Every process is started with a time limit and killed if the test
ends early.
"""

import os
import textwrap

import jax
import pytest
from training_helpers import free_port, nsp_config, read_jsonl, run_worker_processes

from hmar_jax.training.trainer import Trainer

WORKER = textwrap.dedent("""
  import json, os, sys
  pid, nprocs, port, workdir, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nprocs}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["TQDM_DISABLE"] = "1"
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.path.insert(0, "tests")
  import training_helpers as th
  from hmar_jax.training.trainer import Trainer

  c = th.nsp_config("hmar", steps=steps)
  c.mesh.shape = (2, 2, 1)
  c.optim.schedule = "constant"   # the same learning rates whatever num_steps is
  c.checkpoint.every_steps = 2
  if nprocs > 1:
    c.distributed.mode = "explicit"
    c.distributed.coordinator_address = f"localhost:{port}"
    c.distributed.num_processes = nprocs
    c.distributed.process_id = pid
    c.distributed.initialization_timeout = 60
  trainer = Trainer(c, workdir)
  local = trainer.make_loader(0)
  first = next(iter(local))
  result = trainer.fit()
  print("RESULT" + json.dumps({"losses": [h["loss"] for h in result["history"]], "step": result["step"],
                               "processes": jax.process_count(), "local_devices": jax.local_device_count(),
                               "first_labels": first["labels"].tolist()}), flush=True)
""")


def _launch(nprocs: int, workdir, steps: int) -> list[dict]:
  port = str(free_port())
  argv = [[str(p), str(nprocs), port, str(workdir), str(steps)] for p in range(nprocs)]
  return run_worker_processes(WORKER, argv, timeout=300)


def _single_process_reference(workdir, steps: int) -> dict:
  """The same run in this process on one device (meshes give the same losses: test_training_sharded)."""
  config = nsp_config("hmar", steps=steps)
  config.checkpoint.every_steps = 100
  trainer = Trainer(config, str(workdir), devices=jax.devices()[:1])
  first = next(iter(trainer.make_loader(0)))
  result = trainer.fit()
  return {"losses": [h["loss"] for h in result["history"]], "first_labels": first["labels"].tolist()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  first = _launch(2, root / "two", 4)
  resumed = _launch(2, root / "two", 6)
  single = _single_process_reference(root / "single", 6)
  return root, single, first, resumed


def test_two_processes_share_one_mesh(runs):
  _, _, first, _ = runs
  assert [r["processes"] for r in first] == [2, 2] and [r["local_devices"] for r in first] == [2, 2]


def test_each_process_reads_its_own_half_of_the_batch(runs):
  _, single, first, _ = runs
  halves = [r["first_labels"] for r in first]
  assert len(halves[0]) == len(halves[1]) == len(single["first_labels"]) // 2
  assert halves[0] + halves[1] == single["first_labels"]


def test_two_processes_match_the_single_process_losses(runs):
  _, single, first, _ = runs
  for r in first:
    assert r["losses"] == pytest.approx(single["losses"][:4], rel=2e-6)


def test_two_processes_resume_from_their_checkpoint(runs):
  root, single, _, resumed = runs
  for r in resumed:
    assert r["step"] == 6
    assert r["losses"] == pytest.approx(single["losses"][4:], rel=2e-6)  # steps 5 and 6 only
  assert sorted(os.listdir(root / "two" / "checkpoints")) == ["4", "6"]


def test_only_process_zero_writes_logs_and_parameters(runs):
  root, _, _, _ = runs
  rows = read_jsonl(root / "two" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one writer: no duplicated rows
  assert os.path.isdir(root / "two" / "params" / "params")
