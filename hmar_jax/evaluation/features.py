"""Inception features of an image batch: sharded over the local devices, batched, cached on disk.

The batch axis is split over a one-axis Mesh of the local devices ('data'), the weights replicated.
Features are cached in `cache_dir` under a key made of the images file's sha256, the weights'
fingerprint and this protocol's version, so a second evaluation of the same samples (another
metric, another reference) skips the network.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from hmar_jax.evaluation.batches import SPATIAL_DIM, ImageBatch, file_digest, read_batches
from hmar_jax.evaluation.inception import POOL_DIM, InceptionV3

CACHE_VERSION = "adm-inception-features-v1"


class FeatureExtractor:
  """uint8 images [N, H, W, 3] -> (pool_3 [N, 2048], spatial [N, 2023]) float32, jitted over a device Mesh."""

  def __init__(self, model: InceptionV3, batch_size: int, devices=None):
    devices = list(devices or jax.local_devices())
    if batch_size < 1:
      raise ValueError(f"batch size must be >= 1, got {batch_size}")
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a whole number of images per device
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._data = NamedSharding(self.mesh, PartitionSpec("data"))
    self._state = jax.device_put(state, replicated)

    def forward(state, images):
      out = nnx.merge(graphdef, state)(images)
      return out["pool_3"], out["spatial"]

    self._forward = jax.jit(forward, in_shardings=(replicated, self._data), out_shardings=self._data)

  def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One batch of at most batch_size images (padded with black images to a fixed shape: one compile)."""
    n = len(images)
    if n < self.batch_size:
      images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)])
    pool, spatial = self._forward(self._state, jax.device_put(jnp.asarray(images), self._data))
    return np.asarray(pool)[:n], np.asarray(spatial)[:n]

  def extract(self, batch: ImageBatch, desc: str = "inception features") -> tuple[np.ndarray, np.ndarray]:
    n = batch.shape[0]
    pools, spatials = [], []
    with tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True) as bar:
      for images in read_batches(batch, self.batch_size):
        pool, spatial = self.run(images)
        pools.append(pool)
        spatials.append(spatial)
        bar.update(len(images))
    return np.concatenate(pools), np.concatenate(spatials)


def cache_key(images_digest: str, weights_fingerprint: str) -> str:
  return hashlib.sha256(f"{CACHE_VERSION}:{images_digest}:{weights_fingerprint}".encode()).hexdigest()


def _read_cache(path: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
  try:
    with np.load(path) as data:
      pool, spatial = data["pool_3"], data["spatial"]
  except (OSError, ValueError, KeyError, EOFError):
    return None  # unreadable (cut short, another format): computed again and rewritten
  if pool.shape != (n, POOL_DIM) or spatial.shape != (n, SPATIAL_DIM):
    return None
  return pool, spatial


def _write_cache(path: str, pool: np.ndarray, spatial: np.ndarray) -> None:
  """Written to a temporary file and renamed, so an interrupted write leaves no half file behind."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, pool_3=pool, spatial=spatial)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def batch_features(
  batch: ImageBatch,
  extractor: FeatureExtractor,
  weights_fingerprint: str,
  cache_dir: str | None,
  desc: str = "inception features",
) -> tuple[np.ndarray, np.ndarray]:
  """(pool_3 [N, 2048], spatial [N, 2023]) of `batch`, from the cache when it holds them (cache_dir None: no cache)."""
  if not cache_dir:
    return extractor.extract(batch, desc)
  path = os.path.join(cache_dir, cache_key(file_digest(batch.path), weights_fingerprint) + ".npz")
  cached = _read_cache(path, batch.shape[0]) if os.path.exists(path) else None
  if cached is not None:
    return cached
  pool, spatial = extractor.extract(batch, desc)
  _write_cache(path, pool, spatial)
  return pool, spatial
