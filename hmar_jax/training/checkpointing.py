"""Training checkpoints: orbax CheckpointManager over the train state, the data iterator and metadata.

Each checkpoint WORKDIR/checkpoints/<step>/ holds three items:
  state  the TrainState arrays (parameters, optimiser state, EMA, step, PRNG key, task state), each
         process writing its own shards; restored onto any mesh (the target's shardings decide)
  data   the grain iterator state of every process (one small JSON per process)
  meta   JSON: config, task, mesh and process count at save time, and a checksum of every array
Saves are asynchronous (the arrays are copied off the devices, then written in a background
thread while training goes on). Orbax writes into a temporary directory and renames it when it is
complete, so a save cut short by a crash or SIGKILL is never restored: its temporary folder is
deleted at the next start, and a step folder without orbax's commit marker is set aside.

Nothing fails silently:
  * the constructor checks the directory can be created and written (before anything is compiled);
  * a save that fails (full disk, read-only file system), in the call or later in orbax's background
    thread, removes its temporary folder and raises one CheckpointWriteError naming the directory
    and the OS error, instead of orbax's thread and asyncio tracebacks;
  * a checkpoint of another model (other keys or shapes) is refused key by key before reading it;
  * a checkpoint whose files TensorStore cannot read, whose arrays no longer match the checksums
    saved with them, or that holds NaN / Inf is refused with one CheckpointCorruptError naming the
    step folder and the array, and saying which earlier step deleting it would resume from.

Why these checksums: the state is sharded over the devices of several processes, so a checksum of
each array's bytes would need the whole array on one host (a gather as large as the model) at every
save. Instead each array's checksum is computed on the devices, where it lives, as the sum modulo
2**32 of a hash of (element bits, flat element index). Integer addition is exact and order-free, so
the value does not depend on the sharding: saved on one mesh, verified after restoring onto
another. It costs one pass over the state on the devices (no transfer) and one small jit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax
from jax.experimental import multihost_utils

from hmar_jax.checkpoint import (
  CheckpointCorruptError,
  CheckpointMismatchError,
  CheckpointWriteError,
  OrbaxFailureLogFilter,
  describe_os_error,
  describe_read_error,
  ignore_closed_loop_callbacks,
  quiet_after_write_failure,
  remove_until_settled,
)

ITEMS = ("state", "data", "meta")
COMMIT_MARKER = "commit_success.txt"  # written by orbax when a checkpoint is finalised
TMP_TAG = ".orbax-checkpoint-tmp"  # orbax writes a checkpoint here, then renames it
CHECKSUMS_KEY = "array_checksums"  # in the meta item: {key path: [checksum, dtype]}

__all__ = [
  "CheckpointCorruptError",
  "CheckpointManager",
  "CheckpointMismatchError",
  "CheckpointWriteError",
  "check_writable",
]


class _Snapshot:
  """An iterator position frozen at save time, in the form grain's checkpoint handler writes."""

  def __init__(self, state: Any):
    self._state = json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


def check_writable(directory: str | os.PathLike, what: str = "checkpoint directory") -> None:
  """Creates `directory` if needed and writes (and removes) a small probe file in it.

  Raises:
    CheckpointWriteError naming the directory and the OS error (read-only, permission, full disk).
  """
  directory = os.path.abspath(os.fspath(directory))
  # One probe per process: on a shared file system every process writes its shards here.
  probe = os.path.join(directory, f".write-probe-{jax.process_index()}-{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    fix = "free some space or use another --workdir" if e.errno == errno.ENOSPC else "use a writable --workdir"
    raise CheckpointWriteError(f"cannot write to the {what} {directory}: {describe_os_error(e) or e}; {fix}") from e
  finally:
    if os.path.exists(probe):
      os.remove(probe)


# ----------------------------------------------------------------------------- array checksums


def _bits_u32(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (8-byte elements: two words, a trailing axis of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (1, 2):
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
  """A bijective 32-bit finaliser (every input bit changes about half of the output bits)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _checksum(x: jax.Array) -> jax.Array:
  """uint32 scalar: sum over elements of mix(bits ^ mix(flat index)), modulo 2**32. A change of one
  element always changes it (mix is a bijection); moved or several changed elements almost surely."""
  bits = _bits_u32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(bits.ndim)):  # the C-order flat index, modulo 2**32 (no 64-bit integers)
    index = index + lax.broadcasted_iota(jnp.uint32, bits.shape, d) * np.uint32(stride % 2**32)
    stride *= bits.shape[d]
  return jnp.sum(_mix(bits ^ _mix(index + np.uint32(0x9E3779B9))), dtype=jnp.uint32)


def _inspect_impl(arrays: list) -> tuple[jax.Array, jax.Array]:
  """(checksums uint32 (n,), all-finite flags bool (n,)) of n arrays, computed where they live."""
  sums = jnp.stack([_checksum(x) for x in arrays])
  finite = jnp.stack(
    [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True) for x in arrays]
  )
  return sums, finite


_inspect = jax.jit(_inspect_impl)
# On CPU, LLVM's optimisation of these two small kernels per array takes most of the compile time
# (seconds for a few hundred arrays); unoptimised, they still read the state at memory speed.
_inspect_unoptimised = jax.jit(
  _inspect_impl, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _key_str(path: tuple) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _arrays(tree: Any) -> dict[str, Any]:
  """{key path 'a/b/0': array} of the array leaves of a pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key_str(p): x for p, x in leaves if hasattr(x, "shape") and hasattr(x, "dtype")}


def inspect_arrays(tree: Any) -> dict[str, tuple[int, str, bool]]:
  """{key path: (checksum, dtype, all finite)} of every array of `tree` (collective over processes:
  every process calls it with its part of the same global arrays)."""
  arrays = _arrays(tree)
  if not arrays:
    return {}
  devices = [d for x in arrays.values() if isinstance(x, jax.Array) for d in x.devices()][:1]
  platform = devices[0].platform if devices else jax.default_backend()
  sums, finite = (_inspect_unoptimised if platform == "cpu" else _inspect)(list(arrays.values()))
  sums, finite = _to_host(sums), _to_host(finite)
  return {k: (int(s), str(x.dtype), bool(f)) for (k, x), s, f in zip(arrays.items(), sums, finite, strict=True)}


def _agreed_checksums(local: dict[str, tuple[int, str, bool]]) -> dict[str, list]:
  """{key: [checksum, dtype]} for the meta item, or [checksum, dtype, [other processes' checksums]].

  Each process checksums its own replica of a replicated array. Replicas can differ in their last
  bits when a gradient reaches them through an order-dependent GPU reduction (a scatter-add run on
  every device after the all-reduce); orbax then writes one of them. Every process's value is kept,
  so a restore accepts whichever replica was written, and the drift is logged, naming the arrays.
  """
  out = {k: [s, dtype] for k, (s, dtype, _) in local.items()}
  if jax.process_count() == 1 or not local:
    return out
  keys = list(local)
  every = np.asarray(multihost_utils.process_allgather(np.asarray([local[k][0] for k in keys], np.uint32)))
  drifted = []
  for j, k in enumerate(keys):
    others = sorted({int(v) for v in every[:, j]} - {out[k][0]})
    if others:
      out[k].append(others)
      drifted.append(k)
  if drifted:
    logging.warning(
      "replicas of %d arrays differ between processes (non-deterministic reductions), e.g. %s",
      len(drifted),
      ", ".join(drifted[:5]),
    )
  return out


class CheckpointManager:
  """Periodic, asynchronous, resumable training checkpoints."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool = True):
    """Raises CheckpointWriteError when `directory` cannot be created or written."""
    self.directory = os.path.abspath(os.fspath(directory))
    check_writable(self.directory)
    if jax.process_index() == 0:
      self._remove_unfinished()
    # Step folders are made before save() returns: made in the background (orbax's default), a
    # non-primary process's data-iterator item could be written before its folder exists.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
    self._unconfirmed: list[int] = []  # steps whose (asynchronous) save has not been waited for
    self._log_filter: OrbaxFailureLogFilter | None = None
    self._failed = False

  def _remove_unfinished(self) -> None:
    """Deletes the temporary folders of saves that never finished (a crash mid-save), and moves
    step folders without the commit marker aside (to '<step>.incomplete'), out of orbax's sight."""
    if not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      path = os.path.join(self.directory, name)
      if TMP_TAG in name:
        logging.warning("removing the unfinished checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
      elif name.isdigit() and not os.path.exists(os.path.join(path, COMMIT_MARKER)):
        logging.warning("checkpoint %s is incomplete (no %s); moved to %s.incomplete", path, COMMIT_MARKER, path)
        shutil.rmtree(path + ".incomplete", ignore_errors=True)
        os.replace(path, path + ".incomplete")

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (None when there is none)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints, oldest first. A step folder without orbax's commit marker
    (a copy cut short, a half-synced file system) is never restored."""
    good = []
    for step in sorted(self._manager.all_steps()):
      if os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER)):
        good.append(step)
      else:
        logging.warning("checkpoint %s/%d is incomplete (no %s); ignoring it", self.directory, step, COMMIT_MARKER)
    return good

  # ---------------------------------------------------------------- saving
  def save(self, step: int, state: dict, data_iterator: Any, meta: dict) -> None:
    """Starts saving `state` (a pytree of arrays), the iterator's position and `meta` at `step`.

    The caller may donate `state`'s buffers to the next step as soon as this returns: orbax has
    copied them to host memory by then, except on CPU devices, where that 'copy' is a view of the
    same buffer; there the state is first copied on the device.

    Raises:
      CheckpointWriteError when this save, or the previous one still in flight, cannot be written.
    """
    checksums = _agreed_checksums(inspect_arrays(state))
    if any(
      d.platform == "cpu" for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array) for d in leaf.devices()
    ):
      state = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)
    meta = dict(meta, **{CHECKSUMS_KEY: checksums})
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      # The position is read now, in this thread: grain's handler would read it in orbax's
      # background thread while this one goes on drawing batches from the same iterator.
      args["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data_iterator.get_state()))
    self._unconfirmed.append(int(step))
    self._guarded(lambda: self._manager.save(int(step), args=ocp.args.Composite(**args), force=True))

  def _guarded(self, fn: Callable[[], Any]) -> Any:
    """Runs an orbax call that may write (or report a background write's failure) with orbax's
    error logs held back; a failure becomes one CheckpointWriteError (OS errors) after the
    temporary folders are removed."""
    if self._failed:
      raise CheckpointWriteError(f"an earlier checkpoint save in {self.directory} failed; no further saves are made")
    if self._log_filter is None:
      ignore_closed_loop_callbacks()
      self._log_filter = OrbaxFailureLogFilter().__enter__()
    try:
      return fn()
    except Exception as e:
      self._failed = True
      self._settle()
      self._remove_temporary()
      self._release_log_filter()
      reason = describe_os_error(e)
      if reason is None:
        raise
      quiet_after_write_failure()
      steps = ", ".join(map(str, self._unconfirmed)) or "?"
      hint = "free some space or" if f"Errno {errno.ENOSPC}]" in reason else "make it writable or"
      done = self._complete_steps_on_disk()
      kept = f"the complete checkpoint of step {done[-1]} is intact" if done else "no complete checkpoint is kept"
      raise CheckpointWriteError(
        f"could not save the checkpoint of step {steps} in {self.directory}: {reason}; its unfinished folder was "
        f"removed and {kept}; {hint} use another --workdir, then rerun to resume"
      ) from e

  def _settle(self) -> None:
    """After a failed save: lets orbax's other background writes end (they go on after the first
    failure is reported, and would recreate the temporary folder after it is removed). Not with
    several processes: closing waits at a barrier the processes whose save went well never reach
    (there `_remove_temporary` retrying is all)."""
    if jax.process_count() > 1:
      return
    with contextlib.suppress(Exception):  # the same failure again, or another one of this save
      self._manager.close()

  def _release_log_filter(self) -> None:
    if self._log_filter is not None:
      self._log_filter.__exit__(None, None, None)
      self._log_filter = None

  def _remove_temporary(self) -> None:
    def temporary() -> list[str]:
      names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
      return [os.path.join(self.directory, n) for n in names if TMP_TAG in n]

    if not remove_until_settled(temporary):
      logging.warning("could not remove the unfinished checkpoint folders %s", temporary())

  def _complete_steps_on_disk(self) -> list[int]:
    names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
    return sorted(
      int(n) for n in names if n.isdigit() and os.path.exists(os.path.join(self.directory, n, COMMIT_MARKER))
    )

  def wait(self) -> None:
    """Waits for the saves in flight. Raises CheckpointWriteError when one of them failed."""
    if self._failed:
      return
    self._guarded(self._manager.wait_until_finished)
    self._unconfirmed.clear()
    self._release_log_filter()

  def close(self) -> None:
    """Waits for the saves in flight and releases orbax's threads (raising as `wait` does)."""
    try:
      self.wait()
    finally:
      if not self._failed:  # (a failed save has closed orbax's manager already)
        self._manager.close()
      self._release_log_filter()

  # ---------------------------------------------------------------- restoring
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def _advice(self, step: int) -> str:
    """What to do about a damaged checkpoint at `step`."""
    earlier = [s for s in self.all_steps() if s < step]
    if earlier:
      return f"delete {self._step_dir(step)} to resume from the previous checkpoint (step {earlier[-1]})"
    return (
      f"there is no earlier checkpoint: delete {self._step_dir(step)} to start the run over, or use a new --workdir"
    )

  def _damaged(self, step: int, e: BaseException) -> CheckpointCorruptError:
    return CheckpointCorruptError(
      f"checkpoint {self._step_dir(step)} is damaged and cannot be read: {describe_read_error(e)}; {self._advice(step)}"
    )

  def restore_meta(self, step: int) -> dict:
    try:
      with OrbaxFailureLogFilter():
        return self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001 - a missing or garbled meta file: orbax raises anything
      raise self._damaged(step, e) from e

  def check_layout(self, step: int, abstract_state: Any) -> None:
    """Refuses, key by key, a checkpoint whose arrays differ from `abstract_state`'s (another model)."""
    try:
      # The item's own handler: it reads the array metadata only (no step-level files, no barrier).
      stored = ocp.StandardCheckpointHandler().metadata(epath.Path(self._step_dir(step)) / "state")
    except Exception as e:  # noqa: BLE001
      raise self._damaged(step, e) from e
    stored = getattr(stored, "tree", stored)
    have, want = _arrays(stored), _arrays(abstract_state)
    problems = [
      (k, f"{k}: checkpoint {tuple(have[k].shape)}, this config {tuple(want[k].shape)}")
      for k in have.keys() & want.keys()
      if tuple(have[k].shape) != tuple(want[k].shape)
    ]
    problems += [(k, f"{k}: not in the checkpoint") for k in want.keys() - have.keys()]
    problems += [(k, f"{k}: only in the checkpoint") for k in have.keys() - want.keys()]
    if problems:
      # The parameters first: they say more about the model than the optimiser state that follows them.
      problems = [text for _, text in sorted(problems, key=lambda p: (not p[0].startswith("params/"), p[0]))]
      shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
      raise CheckpointMismatchError(
        f"the checkpoint {self._step_dir(step)} is another model's training state: {len(problems)} of its arrays "
        f"differ from this config ({shown}). The workdir {os.path.dirname(self.directory)} holds another model's "
        f"run: use a new --workdir, or the config that run was started with (stored in "
        f"{os.path.join(self._step_dir(step), 'meta', 'metadata')})"
      )

  def _verify(self, step: int, state: Any, checksums: dict | None) -> None:
    """Refuses restored arrays that differ from the checksums saved with them, or hold NaN / Inf.
    Checkpoints written before checksums existed (no `checksums`) are checked for NaN / Inf only."""
    for key, (value, dtype, finite) in inspect_arrays(state).items():
      saved = (checksums or {}).get(key)
      accepted = () if saved is None else (int(saved[0]), *(int(v) for v in (saved[2] if len(saved) > 2 else ())))
      if saved is not None and saved[1] == dtype and value not in accepted:
        raise CheckpointCorruptError(
          f"checkpoint {self._step_dir(step)} is corrupt: array {key} does not match the checksum saved "
          f"with it (its data changed on disk); {self._advice(step)}"
        )
      if not finite:
        raise CheckpointCorruptError(
          f"checkpoint {self._step_dir(step)} is corrupt: array {key} holds NaN/Inf values; {self._advice(step)}"
        )

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """The state saved at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings).

    With `data_iterator`, its position is set from the checkpoint when the checkpoint holds one for
    this process count; returns (state, whether the iterator was restored).

    Raises:
      CheckpointMismatchError when the checkpoint holds other keys or shapes (another model's run).
      CheckpointCorruptError when its files cannot be read, its arrays differ from their saved
        checksums or hold NaN / Inf (naming the step folder and the array).
    """
    self.check_layout(step, abstract_state)
    meta = self.restore_meta(step)
    try:
      with OrbaxFailureLogFilter():
        state = self._manager.restore(
          int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        ).state
    except Exception as e:  # noqa: BLE001 - TensorStore reports damaged files as plain Exception / ValueError
      raise self._damaged(step, e) from e
    self._verify(step, state, meta.get(CHECKSUMS_KEY))
    restored_data = False
    same_layout = int(meta.get("process_count", 1)) == jax.process_count()
    if data_iterator is not None and same_layout and self._has_item(step, "data"):
      try:
        self._manager.restore(
          int(step), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
        )
      except Exception as e:  # noqa: BLE001
        raise self._damaged(step, e) from e
      restored_data = True
    return state, restored_data

  def _has_item(self, step: int, name: str) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), name))

  def reached_preemption(self, step: int) -> bool:
    """True at the step where every process agrees a preemption notice arrived (multi-process runs)."""
    return self._manager.reached_preemption(int(step))
