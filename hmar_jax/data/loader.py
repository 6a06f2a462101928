"""The training loader: one global example order, each process reading the rows of every batch it holds.

Global batch t holds examples [t * B, (t + 1) * B) of a shuffled, endlessly repeated order (re-drawn
each epoch from `seed`). A process reads local batch t = the examples at positions t * B + r for its
`rows` r (sorted): the rows of the batch shards its devices hold (hmar_jax.parallel.process_batch_rows).
Processes whose devices hold the same shards (a tensor axis spanning processes) read the same rows in
the same order; together the processes read exactly the batch one process would read alone, so a
run's losses do not depend on how many processes share it. The default rows, from process_index p of
process_count P, are the p-th of P equal blocks (a mesh split over processes by data x fsdp only).

The loader is a grain pipeline (threads, optional worker processes, read-ahead) whose iterator state
is checkpointed with the training state (`grain.checkpoint.CheckpointSave`): it counts local batches
from `start_step`, whatever the rows. Local batch t is a pure function of (seed, t, rows), so a run
can also restart at any step without that state.

A source with a `random_augment(record, rng)` method (hmar_jax.data.augment.RandomCrop: the
official random crop) has it applied to every position of the repeated stream, with a generator
seeded by (seed, position): local batch t stays a pure function of (seed, t, rows), and each epoch
draws new crops.

Unreadable records (a corrupt image file) do not stop training: `SkipUnreadable` replaces each by
the next readable record and counts it in the record's 'skipped' field.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from hmar_jax.data.sources import CorruptImageError

# Consecutive unreadable records tolerated before giving up (a broken dataset, not a bad file).
MAX_CONSECUTIVE_UNREADABLE = 64


def augment_seed(seed: int) -> int:
  """The random_map seed of the augmentation: derived from the order's seed, yet not the same stream."""
  return int(np.random.SeedSequence([int(seed), 0x617567]).generate_state(1)[0])


def _leave_ctrl_c_to_the_trainer(worker_index: int, worker_count: int) -> None:
  """Runs in each grain worker process. A terminal's Ctrl-C reaches every process of its process
  group, the workers too: they ignore it, so the trainer can save the step it reached and stop
  (a worker killed by it would break the loader). SIGTERM keeps its default: grain ends its
  workers with it."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class ArraySource:
  """grain random-access source over equal-length arrays: record i = {name: array[i]}."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource: arrays differ in length: {lengths}")
    self._arrays = dict(arrays)
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}


class SkipUnreadable:
  """Wraps a source: an unreadable record is replaced by the next readable one (index + 1, ...).

  Each record gains 'skipped' (int32): how many unreadable records were passed over to produce it,
  so the trainer can count them. The first failure of each index is logged with its message.
  """

  def __init__(self, source, errors: tuple[type[BaseException], ...] = (CorruptImageError, OSError)):
    self._source = source
    self._errors = errors

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._source)
    for skipped in range(MAX_CONSECUTIVE_UNREADABLE + 1):
      try:
        record = dict(self._source[(index + skipped) % n])
      except self._errors as e:  # noqa: PERF203 - the retry is the point
        logging.warning("skipping unreadable record %d: %s", (index + skipped) % n, e)
        continue
      record["skipped"] = np.int32(skipped)
      return record
    raise RuntimeError(
      f"{MAX_CONSECUTIVE_UNREADABLE + 1} consecutive records from index {index} are unreadable; "
      "the dataset looks broken"
    )

  def __getstate__(self):
    return {"_source": self._source, "_errors": self._errors}

  def __setstate__(self, state):
    self.__dict__.update(state)


class _RowsOfEachBatch(grain.MapDataset):
  """Element j = parent[(j // R) * B + rows[j % R]] (R = len(rows)): the chosen rows of each
  consecutive B-element block of the parent, in `rows` order."""

  def __init__(self, parent: grain.MapDataset, batch: int, rows: tuple[int, ...]):
    super().__init__(parent)
    self._batch = int(batch)
    self._rows = tuple(int(r) for r in rows)
    self._length = len(parent) // self._batch * len(self._rows)

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    block, k = divmod(int(index), len(self._rows))
    return block * self._batch + self._rows[k]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._parent_index(i) for i in indices])  # noqa: SLF001 - grain's batched read

  def __str__(self) -> str:
    return f"RowsOfEachBatch(batch={self._batch}, rows={len(self._rows)})"


def make_train_loader(
  source,
  *,
  global_batch: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  rows: Sequence[int] | None = None,
  start_step: int = 0,
  num_threads: int = 4,
  prefetch: int = 8,
  worker_count: int = 0,
) -> grain.IterDataset:
  """The per-process training pipeline (see the module docstring).

  Args:
    source: random-access source of dict records; one with `random_augment(record, rng)` has it
      applied per position of the repeated stream (see the module docstring).
    global_batch: examples per step over all processes.
    seed: the order's seed.
    process_index / process_count: read the process_index-th of process_count equal blocks of each
      batch (global_batch divisible by process_count); ignored when `rows` is given.
    rows: the rows of each global batch to read, distinct and in [0, global_batch), in the order
      they are returned (sorted, from hmar_jax.parallel.process_batch_rows).
    start_step: first global batch to produce (restarting without the iterator state).
    num_threads, prefetch: grain read threads and batches read ahead; worker_count > 0: processes.
  Returns:
    an endless grain IterDataset of {field: (len(rows), ...)} numpy batches
    (global_batch / process_count rows by default).
  """
  if rows is None:
    if global_batch % process_count:
      raise ValueError(f"the global batch {global_batch} is not divisible by the {process_count} processes")
    local = global_batch // process_count
    rows = range(process_index * local, (process_index + 1) * local)
  rows = tuple(int(r) for r in rows)
  if not rows or len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= global_batch:
    raise ValueError(f"the rows to read must be distinct and in [0, {global_batch}), got {len(rows)} rows: {rows[:8]}")
  if len(source) < global_batch:
    raise ValueError(f"the dataset has {len(source)} examples, fewer than one global batch of {global_batch}")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  augment = getattr(source, "random_augment", None)
  if augment is not None:  # after repeat(): the generator of position i is seeded by (seed, i)
    ds = ds.random_map(augment, seed=augment_seed(seed))
  # Global batch t is positions [t * B, (t + 1) * B); local batch t is its `rows`.
  ds = _RowsOfEachBatch(ds, global_batch, rows).batch(len(rows), drop_remainder=True)
  ds = ds[start_step:]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app nothing parsed them
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_leave_ctrl_c_to_the_trainer
    )
  return ds
