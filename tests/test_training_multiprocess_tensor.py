"""Meshes whose batch shards do not follow the processes: each process reads the rows its devices hold.

Two JAX processes on one machine (jax.distributed, localhost coordinator), 2 virtual CPU devices
each, their devices interleaved (process 0, process 1, process 0, process 1) before the mesh is made:

* mesh (2, 1, 2) trains 2 steps: every tensor pair spans both processes, so both hold, and read,
  the whole batch;
* mesh (4, 1, 1) resumes that run to step 4 (iterator state and all): process 0 holds batch shards
  0 and 2, process 1 shards 1 and 3.

Both train on exactly the batches of one process alone: their losses equal those of a single-device
run of the same config in the test process. Every process is started with a time limit and killed
if the test ends early.
"""

import json
import textwrap

import jax
import numpy as np
import pytest
from training_helpers import free_port, nsp_config, run_worker_processes

from hmar_jax.data.loader import ArraySource, make_train_loader
from hmar_jax.parallel import process_batch_rows
from hmar_jax.training.trainer import Trainer

BATCH = 8

WORKER = textwrap.dedent("""
  import json, os, sys
  pid, port, workdir, mesh, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["TQDM_DISABLE"] = "1"
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.path.insert(0, "tests")
  import training_helpers as th
  from hmar_jax.training.trainer import Trainer

  c = th.nsp_config("hmar", steps=steps, batch=BATCH)
  c.mesh.shape = tuple(mesh)
  c.checkpoint.every_steps = 2
  c.distributed.mode = "explicit"
  c.distributed.coordinator_address = f"localhost:{port}"
  c.distributed.num_processes = 2
  c.distributed.process_id = pid
  c.distributed.initialization_timeout = 60
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid, initialization_timeout=60)
  local = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(2)]
  trainer = Trainer(c, workdir, devices=[local[0][0], local[1][0], local[0][1], local[1][1]])
  first = next(iter(trainer.make_loader(0)))
  result = trainer.fit()
  print("RESULT" + json.dumps({
    "losses": [h["loss"] for h in result["history"]], "rows": trainer.batch_rows.tolist(),
    "first_labels": first["labels"].tolist(),
    "mesh_processes": [[[d.process_index for d in f] for f in dd] for dd in trainer.mesh.devices]}), flush=True)
""").replace("BATCH", str(BATCH))


def _launch(workdir, mesh: tuple[int, int, int], steps: int) -> list[dict]:
  port = str(free_port())
  argv = [[str(p), port, str(workdir), json.dumps(mesh), str(steps)] for p in range(2)]
  return run_worker_processes(WORKER, argv, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess_tensor")
  tensor = _launch(root / "two", (2, 1, 2), 2)
  interleaved = _launch(root / "two", (4, 1, 1), 4)  # resumes the run above on another mesh
  config = nsp_config("hmar", steps=4, batch=BATCH)
  trainer = Trainer(config, str(root / "single"), devices=jax.devices()[:1])
  first = next(iter(trainer.make_loader(0)))
  result = trainer.fit()
  single = {"losses": [h["loss"] for h in result["history"]], "first_labels": first["labels"].tolist()}
  return single, {"tensor": tensor, "interleaved": interleaved}


def test_the_meshes_put_batch_shards_across_processes_as_intended(runs):
  _, two = runs
  for r in two["tensor"]:  # (data, fsdp, tensor): each tensor pair is one device of each process
    assert [pair for data in r["mesh_processes"] for pair in data] == [[0, 1], [0, 1]]
  for r in two["interleaved"]:  # data shards 0..3 on processes 0, 1, 0, 1
    assert [data[0][0] for data in r["mesh_processes"]] == [0, 1, 0, 1]


def test_processes_sharing_every_batch_shard_both_read_the_whole_batch(runs):
  single, two = runs
  for r in two["tensor"]:
    assert r["rows"] == list(range(BATCH))
    assert r["first_labels"] == single["first_labels"]


def test_a_tensor_axis_across_processes_trains_on_the_single_process_batches(runs):
  single, two = runs
  for r in two["tensor"]:
    assert r["losses"] == pytest.approx(single["losses"][:2], rel=2e-6)


def test_processes_holding_non_adjacent_shards_read_exactly_those_rows(runs):
  single, two = runs
  quarter = BATCH // 4
  for p, r in enumerate(two["interleaved"]):
    want = [row for shard in (p, p + 2) for row in range(shard * quarter, (shard + 1) * quarter)]
    assert r["rows"] == want
    assert r["first_labels"] == [single["first_labels"][row] for row in want]


def test_a_run_resumed_on_a_mesh_with_non_adjacent_shards_continues_the_single_process_losses(runs):
  single, two = runs
  for r in two["interleaved"]:
    assert r["losses"] == pytest.approx(single["losses"][2:], rel=2e-6)  # steps 3 and 4 only


# ----------------------------------------------------------------------------- in-process, no cluster


class _FakeDevice:
  def __init__(self, process_index: int):
    self.process_index = process_index


class _FakeSharding:
  """devices_indices_map of `layout`: [(process of the device, (start, stop) of its rows)]."""

  def __init__(self, layout):
    self._map = {_FakeDevice(p): (slice(a, b),) for p, (a, b) in layout}

  def devices_indices_map(self, shape):
    return {d: idx for d, idx in self._map.items()}


def test_batch_rows_are_read_off_the_sharding_not_the_process_index():
  # (2, 1, 2) over 4 processes, tensor pairs (0, 1) and (2, 3): each pair holds one half.
  tensor_pairs = _FakeSharding([(0, (0, 4)), (1, (0, 4)), (2, (4, 8)), (3, (4, 8))])
  assert [process_batch_rows(tensor_pairs, 8, p).tolist() for p in range(4)] == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2
  interleaved = _FakeSharding([(0, (0, 2)), (1, (2, 4)), (0, (4, 6)), (1, (6, 8))])
  assert process_batch_rows(interleaved, 8, 0).tolist() == [0, 1, 4, 5]


def test_the_loader_reads_the_given_rows_of_each_single_process_batch():
  source = ArraySource({"x": np.arange(40, dtype=np.int32)})
  take = lambda loader: [b["x"].tolist() for b, _ in zip(loader, range(7), strict=False)]
  whole = take(make_train_loader(source, global_batch=8, seed=3, num_threads=0))
  rows = [1, 2, 6]
  assert take(make_train_loader(source, global_batch=8, seed=3, rows=rows, num_threads=0)) == [
    [batch[r] for r in rows] for batch in whole
  ]
