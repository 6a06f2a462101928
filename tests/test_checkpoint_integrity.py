"""Damaged checkpoints are refused with one clear error naming the checkpoint and the array, and a
checkpoint that cannot be written fails at once, or leaves nothing half-written behind.

Parameter checkpoints (hmar_jax/checkpoint.py) carry a CRC-32 of every array; training checkpoints
(hmar_jax/training/checkpointing.py) a checksum of every array computed on the devices, the same on
any sharding. Damage is made the way disks and copies make it: bytes overwritten in the middle of a
data file (its size unchanged), a data file cut short, the data of another save in its place.
"""

import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from orbax.checkpoint._src.path import async_path

from hmar_jax import checkpoint
from hmar_jax.checkpoint import CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError
from hmar_jax.training.checkpointing import CHECKSUMS_KEY, TMP_TAG, CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Proj(nnx.Module):
  """One 64 x 64 float32 kernel (16 KiB): the largest data file of its checkpoint is this array."""

  def __init__(self, seed: int):
    self.proj = nnx.Linear(64, 64, use_bias=False, rngs=nnx.Rngs(seed))


def _largest_data_file(directory) -> str:
  files = glob.glob(os.path.join(str(directory), "**", "ocdbt.process_*", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _overwrite_middle(path: str, n: int = 4096, seed: int = 0) -> None:
  """Overwrites n bytes in the middle of a file with random ones (its size unchanged)."""
  size = os.path.getsize(path)
  assert size > n
  with open(path, "r+b") as f:
    f.seek((size - n) // 2)
    f.write(np.random.default_rng(seed).bytes(n))
  assert os.path.getsize(path) == size


def _truncate_half(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _with_nan(seed: int) -> Proj:
  model = Proj(seed)
  kernel = np.asarray(model.proj.kernel[...]).copy()
  kernel[3, 5] = np.nan
  model.proj.kernel[...] = jnp.asarray(kernel)
  return model


# ----------------------------------------------------------------------------- parameter checkpoints


@pytest.mark.parametrize("read", ["restore_params", "read_params_tree"])
def test_a_params_checkpoint_with_4_kib_overwritten_is_refused_naming_the_checkpoint_and_array(tmp_path, read):
  path = checkpoint.save_params(tmp_path / "ckpt", Proj(0))
  _overwrite_middle(_largest_data_file(path))
  with pytest.raises(CheckpointCorruptError, match=rf"checkpoint {path} .*proj/kernel"):
    if read == "restore_params":
      checkpoint.restore_params(path, Proj(1))
    else:
      checkpoint.read_params_tree(path)


def test_a_params_checkpoint_whose_arrays_changed_on_disk_is_refused_by_its_checksums(tmp_path):
  path = checkpoint.save_params(tmp_path / "ckpt", Proj(0))
  other = checkpoint.save_params(tmp_path / "other", Proj(1))  # readable, finite, other values
  shutil.rmtree(os.path.join(path, "params"))
  shutil.copytree(os.path.join(other, "params"), os.path.join(path, "params"))
  with pytest.raises(CheckpointCorruptError, match=r"array proj/kernel does not match the checksum"):
    checkpoint.restore_params(path, Proj(2))


def test_a_params_checkpoint_holding_nan_is_refused_naming_the_array(tmp_path):
  path = checkpoint.save_params(tmp_path / "ckpt", _with_nan(0))
  model = Proj(1)
  before = np.asarray(model.proj.kernel[...]).copy()
  with pytest.raises(CheckpointCorruptError, match=r"array proj/kernel holds 1 NaN/Inf value"):
    checkpoint.restore_params(path, model)
  np.testing.assert_array_equal(model.proj.kernel[...], before)  # left untouched


def test_a_params_checkpoint_saved_before_checksums_still_loads(tmp_path):
  saved = Proj(0)
  path = checkpoint.save_params(tmp_path / "ckpt", saved)
  os.remove(os.path.join(path, "hmar_jax_checksums.json"))
  restored = checkpoint.restore_params(path, Proj(1))
  np.testing.assert_array_equal(restored.proj.kernel[...], saved.proj.kernel[...])


def test_a_params_checkpoint_saved_before_checksums_is_still_checked_for_nan(tmp_path):
  path = checkpoint.save_params(tmp_path / "ckpt", _with_nan(0))
  os.remove(os.path.join(path, "hmar_jax_checksums.json"))
  with pytest.raises(CheckpointCorruptError, match=r"array proj/kernel holds 1 NaN/Inf"):
    checkpoint.restore_params(path, Proj(1))


def test_a_truncated_params_checkpoint_is_refused_in_one_line_as_damaged(tmp_path):
  path = checkpoint.save_params(tmp_path / "ckpt", Proj(0))
  _truncate_half(_largest_data_file(path))
  with pytest.raises(CheckpointCorruptError, match=rf"checkpoint {path} is damaged and cannot be read") as err:
    checkpoint.restore_params(path, Proj(1))
  assert "\n" not in str(err.value) and "proj/kernel" in str(err.value)


# ----------------------------------------------------------------------------- write failures


async def _disk_full(path, text):
  """Stands in for orbax's metadata writes (made in its background thread) on a full disk."""
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


async def _disk_full_tensorstore(path, text):
  """The same failure as TensorStore (orbax's array writer) reports it."""
  raise ValueError(
    f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed to write 4096 bytes to file 5: '
    "No space left on device [os_error_code='28']"
  )


def test_a_params_save_on_a_full_disk_names_the_error_and_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(async_path, "write_text", _disk_full)
  with pytest.raises(CheckpointWriteError, match=rf"{tmp_path / 'ckpt'}: \[Errno 28\] No space left on device"):
    checkpoint.save_params(tmp_path / "ckpt", Proj(0))
  assert os.listdir(tmp_path) == []


def test_a_folder_a_late_write_recreates_after_its_removal_is_removed_again(tmp_path):
  target = tmp_path / "ckpt"
  target.mkdir()
  removed_once = threading.Event()

  def late_writer():  # stands in for a TensorStore write that lands after the failure was reported
    while target.exists():
      time.sleep(0.005)
    removed_once.set()
    time.sleep(0.1)
    (target / "ocdbt.process_0" / "d").mkdir(parents=True)

  writer = threading.Thread(target=late_writer)
  writer.start()
  assert checkpoint.remove_until_settled(lambda: [str(target)], quiet_s=0.5)
  writer.join()
  assert removed_once.is_set() and os.listdir(tmp_path) == []


def test_a_folder_that_keeps_coming_back_is_reported_as_left(tmp_path):
  target = tmp_path / "ckpt"
  stop = threading.Event()

  def stubborn_writer():
    while not stop.is_set():
      target.mkdir(exist_ok=True)
      time.sleep(0.01)

  writer = threading.Thread(target=stubborn_writer)
  writer.start()
  try:
    assert not checkpoint.remove_until_settled(lambda: [str(target)], quiet_s=0.2, timeout_s=0.5)
  finally:
    stop.set()
    writer.join()


def _state(seed: int, width: int = 64) -> dict:
  """A small train state: parameters, Adam state and a step counter."""
  params = {"w": jax.random.normal(jax.random.key(seed), (width, 32)), "b": jnp.zeros((32,))}
  return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.array(seed, jnp.int32)}


def _abstract(width: int = 64) -> dict:
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), jax.eval_shape(lambda: _state(0, width))
  )


def _saved(directory, steps=(1, 2)) -> CheckpointManager:
  """A manager holding a checkpoint of _state(step) at each step."""
  ckpt = CheckpointManager(directory, max_to_keep=5)
  for step in steps:
    ckpt.save(step, _state(step), None, {"process_count": 1})
  ckpt.wait()
  return ckpt


@pytest.mark.parametrize("failure", [_disk_full, _disk_full_tensorstore], ids=["oserror", "tensorstore"])
def test_a_train_save_on_a_full_disk_raises_one_error_naming_the_directory_and_os_error(tmp_path, monkeypatch, failure):
  ckpt = _saved(tmp_path / "ckpts", steps=(1,))
  monkeypatch.setattr(async_path, "write_text", failure)
  ckpt.save(2, _state(2), None, {})  # orbax writes in the background: the failure shows at wait / close
  with pytest.raises(CheckpointWriteError, match=r"step 2 in .*ckpts: \[Errno 28\] No space left on device") as err:
    ckpt.close()
  assert "\n" not in str(err.value)


def test_a_failed_train_save_leaves_no_temporary_folder_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
  ckpt = _saved(tmp_path / "ckpts", steps=(1,))
  monkeypatch.setattr(async_path, "write_text", _disk_full)
  ckpt.save(2, _state(2), None, {})
  with pytest.raises(CheckpointWriteError):
    ckpt.close()
  monkeypatch.undo()
  assert not [n for n in os.listdir(tmp_path / "ckpts") if TMP_TAG in n]
  again = CheckpointManager(tmp_path / "ckpts", max_to_keep=5)
  assert again.all_steps() == [1]
  state, _ = again.restore(1, _abstract())
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  again.close()


def test_a_failed_train_save_logs_no_orbax_tracebacks(tmp_path, monkeypatch, caplog):
  for name in ("absl", "asyncio"):  # without the filters an earlier failure in this process left
    monkeypatch.setattr(logging.getLogger(name), "filters", [])
  ckpt = _saved(tmp_path / "ckpts", steps=(1,))
  monkeypatch.setattr(async_path, "write_text", _disk_full)
  with caplog.at_level(logging.ERROR):
    ckpt.save(2, _state(2), None, {})
    with pytest.raises(CheckpointWriteError):
      ckpt.close()
  assert [r.getMessage()[:100] for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_checkpoint_directory_that_cannot_be_created_is_refused_at_construction(tmp_path):
  (tmp_path / "workdir").write_text("a file where the workdir should be")
  with pytest.raises(CheckpointWriteError, match=rf"cannot write to the checkpoint directory {tmp_path}/workdir/ckpts"):
    CheckpointManager(tmp_path / "workdir" / "ckpts", max_to_keep=2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_checkpoint_directory_is_refused_at_construction(tmp_path):
  (tmp_path / "ckpts").mkdir()
  os.chmod(tmp_path / "ckpts", 0o555)
  try:
    with pytest.raises(CheckpointWriteError, match=r"ckpts: \[Errno 13\] Permission denied"):
      CheckpointManager(tmp_path / "ckpts", max_to_keep=2)
  finally:
    os.chmod(tmp_path / "ckpts", 0o755)


# ----------------------------------------------------------------------------- training checkpoints


def test_a_train_checkpoint_with_4_kib_overwritten_is_refused_naming_the_step_and_array(tmp_path):
  ckpt = _saved(tmp_path / "ckpts")
  _overwrite_middle(_largest_data_file(tmp_path / "ckpts" / "2"))
  with pytest.raises(CheckpointCorruptError, match=r"checkpoint .*ckpts/2 .*array params/w"):
    ckpt.restore(2, _abstract())
  ckpt.close()


def test_a_train_checkpoint_whose_arrays_changed_on_disk_is_refused_by_its_checksums(tmp_path):
  ckpt = _saved(tmp_path / "ckpts")
  shutil.rmtree(tmp_path / "ckpts" / "2" / "state")  # step 1's arrays: readable, finite, other values
  shutil.copytree(tmp_path / "ckpts" / "1" / "state", tmp_path / "ckpts" / "2" / "state")
  with pytest.raises(CheckpointCorruptError, match=r"ckpts/2 is corrupt: array params/w does not match the checksum"):
    ckpt.restore(2, _abstract())
  ckpt.close()


def test_a_train_checkpoint_holding_nan_is_refused_naming_the_array(tmp_path):
  ckpt = CheckpointManager(tmp_path / "ckpts", max_to_keep=2)
  state = _state(1)
  state["opt_state"][0].nu["b"] = state["opt_state"][0].nu["b"].at[4].set(jnp.inf)
  ckpt.save(1, state, None, {})
  ckpt.wait()
  with pytest.raises(CheckpointCorruptError, match=r"array opt_state/0/nu/b holds NaN/Inf"):
    ckpt.restore(1, _abstract())
  ckpt.close()


def test_a_train_checkpoint_saved_before_checksums_still_restores(tmp_path):
  ckpt = _saved(tmp_path / "ckpts")
  meta_file = tmp_path / "ckpts" / "2" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta[CHECKSUMS_KEY]
  meta_file.write_text(json.dumps(meta))
  state, _ = ckpt.restore(2, _abstract())
  np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
  ckpt.close()


def test_a_truncated_train_checkpoint_is_refused_in_one_line_naming_the_step_to_fall_back_to(tmp_path):
  ckpt = _saved(tmp_path / "ckpts")
  _truncate_half(_largest_data_file(tmp_path / "ckpts" / "2"))
  with pytest.raises(CheckpointCorruptError, match=r"ckpts/2 is damaged") as err:
    ckpt.restore(2, _abstract())
  message = str(err.value)
  assert "\n" not in message
  assert f"delete {tmp_path / 'ckpts' / '2'} to resume from the previous checkpoint (step 1)" in message
  ckpt.close()


def test_a_workdir_of_another_model_names_the_differing_arrays_and_asks_for_a_new_workdir(tmp_path):
  ckpt = _saved(tmp_path / "ckpts")
  with pytest.raises(CheckpointMismatchError) as err:
    ckpt.restore(2, _abstract(width=48))
  message = str(err.value)
  assert "3 of its arrays differ" in message  # w, and Adam's two moments of w
  assert "params/w: checkpoint (64, 32), this config (48, 32)" in message
  assert "use a new --workdir" in message and "strict" not in message
  ckpt.close()


SHARDING_SCRIPT = textwrap.dedent("""
  import json, os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from hmar_jax.training.checkpointing import inspect_arrays

  x = np.random.default_rng(0).standard_normal((8, 12)).astype(np.float32)
  y = x.astype(jax.numpy.bfloat16)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  row = NamedSharding(jax.make_mesh((4,), ("a",)), P("a", None))
  grid = NamedSharding(jax.make_mesh((2, 2), ("a", "b")), P("b", "a"))
  out = {}
  for name, s in (("one", one), ("rows", row), ("grid", grid)):
    out[name] = inspect_arrays({"x": jax.device_put(x, s), "y": jax.device_put(y, s)})
  print("JSON" + json.dumps(out))
""")


def test_train_checkpoint_checksums_are_the_same_on_every_sharding():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", SHARDING_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("JSON")][-1][4:])
  assert out["rows"] == out["one"] and out["grid"] == out["one"]
  assert out["one"]["x"][0] != out["one"]["y"][0]


def test_replicas_that_differ_between_processes_keep_every_checksum_and_are_named(monkeypatch, caplog):
  from hmar_jax.training import checkpointing

  local = {"a": (11, "float32", True), "b": (22, "float32", True)}
  monkeypatch.setattr(checkpointing.jax, "process_count", lambda: 2)
  # Process 1 holds another replica of 'b' (a GPU reduction that ran in another order).
  monkeypatch.setattr(
    checkpointing.multihost_utils, "process_allgather", lambda x: np.stack([x, np.asarray([11, 23], np.uint32)])
  )
  with caplog.at_level("WARNING"):
    agreed = checkpointing._agreed_checksums(local)
  assert agreed == {"a": [11, "float32"], "b": [22, "float32", [23]]}
  assert "replicas of 1 arrays differ" in caplog.text and "b" in caplog.text


def test_a_restored_array_matching_another_processes_replica_is_accepted():
  import types

  from hmar_jax.training import checkpointing

  x = jnp.arange(6.0, dtype=jnp.float32)
  right = checkpointing.inspect_arrays({"x": x})["x"][0]
  manager = types.SimpleNamespace(_step_dir=lambda step: f"ckpt/{step}", _advice=lambda step: "delete it")
  checkpointing.CheckpointManager._verify(manager, 3, {"x": x}, {"x": [right ^ 1, "float32", [right]]})
  with pytest.raises(checkpointing.CheckpointCorruptError, match="array x does not match"):
    checkpointing.CheckpointManager._verify(manager, 3, {"x": x}, {"x": [right ^ 1, "float32"]})
