"""Training checkpoints: orbax CheckpointManager over the train state, the data iterator and metadata.

Each checkpoint WORKDIR/checkpoints/<step>/ holds three items:
  state  the TrainState arrays (parameters, optimiser state, EMA, step, PRNG key, task state), each
         process writing its own shards; restored onto any mesh (the target's shardings decide)
  data   the grain iterator state of every process (one small JSON per process)
  meta   JSON: config, task, mesh and process count at save time
Saves are asynchronous (the arrays are copied off the devices, then written in a background
thread while training goes on). Orbax writes into a temporary directory and renames it when it is
complete, so a save cut short by a crash or SIGKILL is never restored: its temporary folder is
deleted at the next start, and a step folder without orbax's commit marker is set aside.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")
COMMIT_MARKER = "commit_success.txt"  # written by orbax when a checkpoint is finalised
TMP_TAG = ".orbax-checkpoint-tmp"  # orbax writes a checkpoint here, then renames it


class _Snapshot:
  """An iterator position frozen at save time, in the form grain's checkpoint handler writes."""

  def __init__(self, state: Any):
    self._state = json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class CheckpointManager:
  """Periodic, asynchronous, resumable training checkpoints."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    if jax.process_index() == 0:
      self._remove_unfinished()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

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

  def save(self, step: int, state: dict, data_iterator: Any, meta: dict) -> None:
    """Starts saving `state` (a pytree of arrays), the iterator's position and `meta` at `step`.

    The caller may donate `state`'s buffers to the next step as soon as this returns: orbax has
    copied them to host memory by then, except on CPU devices, where that 'copy' is a view of the
    same buffer; there the state is first copied on the device.
    """
    if any(
      d.platform == "cpu" for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array) for d in leaf.devices()
    ):
      state = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      # The position is read now, in this thread: grain's handler would read it in orbax's
      # background thread while this one goes on drawing batches from the same iterator.
      args["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data_iterator.get_state()))
    self._manager.save(int(step), args=ocp.args.Composite(**args), force=True)

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """The state saved at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings).

    With `data_iterator`, its position is set from the checkpoint when the checkpoint holds one for
    this process count; returns (state, whether the iterator was restored).
    """
    state = self._manager.restore(
      int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    ).state
    restored_data = False
    if data_iterator is not None:
      meta = self.restore_meta(step)
      if int(meta.get("process_count", 1)) == jax.process_count() and self._has_item(step, "data"):
        self._manager.restore(
          int(step), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
        )
        restored_data = True
    return state, restored_data

  def _has_item(self, step: int, name: str) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), name))

  def reached_preemption(self, step: int) -> bool:
    """True at the step where every process agrees a preemption notice arrived (multi-process runs)."""
    return self._manager.reached_preemption(int(step))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
