"""Batching pipeline over any random-access source, with grain.

Turns records {'image': (H, W, 3) uint8, 'label': int32 ()} into batches
{'image': (B, H, W, 3) float32 in [-1, 1], 'label': (B,) int32}, the layout and
range the tokenizer and the transformers take (official normalize_01_into_pm1:
x / 255 * 2 - 1).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from absl import flags


def _check_int(name: str, value, low: int):
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low):
    raise ValueError(f"make_dataset: {name} must be an int >= {low}, got {value!r}")


def to_model_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """uint8 images to float32 in [-1, 1]; labels to int32."""
  image = np.asarray(batch["image"])
  if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {image.dtype} {image.shape}")
  return {
    "image": image.astype(np.float32) * np.float32(2 / 255) - np.float32(1),
    "label": np.asarray(batch["label"], np.int32),
  }


def make_dataset(
  source,
  batch_size: int,
  *,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 4,
  prefetch_buffer_size: int = 8,
  worker_count: int = 0,
) -> grain.IterDataset:
  """A grain pipeline of model-ready batches.

  Order: shard (source[shard_index::shard_count], for one data-parallel host)
  -> shuffle (global, re-drawn each epoch from `seed`) -> repeat -> batch ->
  uint8 to float32 in [-1, 1] -> threads (and optionally worker processes).

  Args:
    source: random-access source (len and __getitem__ returning records).
    batch_size: examples per batch (per shard).
    seed: shuffle seed.
    shuffle: shuffle globally per epoch; False keeps index order.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last short batch (only matters with num_epochs).
    shard_index, shard_count: which slice of the data this process reads.
    num_threads, prefetch_buffer_size: grain ReadOptions (record reads in
      threads; 0 threads reads in the calling thread).
    worker_count: > 0 runs the pipeline in that many processes
      (grain mp_prefetch); the source must then be picklable.

  Returns:
    a grain.IterDataset; iter() it for batches {'image': (B, H, W, 3) float32,
    'label': (B,) int32}. Its iterator has get_state()/set_state() to resume.
  """
  _check_int("batch_size", batch_size, 1)
  _check_int("num_epochs", num_epochs, 1)
  _check_int("shard_count", shard_count, 1)
  _check_int("seed", seed, 0)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"make_dataset: shard_index must be in [0, {shard_count}), got {shard_index}")
  if len(source) < shard_count:
    raise ValueError(f"make_dataset: {len(source)} examples cannot fill {shard_count} shards")
  ds = grain.MapDataset.source(source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if len(ds) < batch_size and drop_remainder:
    raise ValueError(
      f"make_dataset: batch_size {batch_size} exceeds the {len(ds)} examples of "
      "this shard (drop_remainder would yield nothing)"
    )
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.map(to_model_batch)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    # grain's worker processes read absl flags; outside an absl app (tests,
    # notebooks) nothing parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds
