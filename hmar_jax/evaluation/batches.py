"""Image batches (.npz, key 'arr_0') and reference statistics, checked before any model work.

The ADM evaluator reads `arr_0` of an .npz: uint8 [N, H, W, 3] in [0, 255]. Reference batches
(VIRTUAL_imagenet256_labeled.npz, ...) also hold precomputed statistics 'mu' [2048],
'sigma' [2048, 2048], 'mu_s' [2023], 'sigma_s' [2023, 2023]; when 'mu' is present the evaluator
uses all four instead of statistics of the reference images (which it still needs for
precision / recall).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from collections.abc import Iterator

import numpy as np

from hmar_jax.evaluation.inception import POOL_DIM, SPATIAL_CHANNELS

SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
IMAGES_KEY = "arr_0"
STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM,) * 2}


@dataclasses.dataclass(frozen=True)
class ImageBatch:
  """An .npz of images: its path, shape [N, H, W, 3] and the .npy members it holds."""

  path: str
  shape: tuple[int, ...]
  keys: tuple[str, ...]


def _read_header(f) -> tuple:
  """(shape, fortran_order, dtype) of an .npy stream, leaving it at the start of the data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f".npy format version {version} (np.savez writes 1.0 or 2.0)")


def _member_header(zf: zipfile.ZipFile, name: str) -> tuple:
  with zf.open(name) as f:
    return _read_header(f)


def open_image_batch(path: str | os.PathLike, what: str) -> ImageBatch:
  """Checks that `path` is an .npz whose 'arr_0' is uint8 [N >= 1, H, W, 3], reading headers only.

  FileNotFoundError if missing; ValueError naming the file and the problem otherwise."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist")
  try:
    with zipfile.ZipFile(path) as zf:
      keys = tuple(n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy"))
      if IMAGES_KEY not in keys:
        raise ValueError(f"{what} {path!r} has no '{IMAGES_KEY}' array (it holds {list(keys)})")
      shape, fortran, dtype = _member_header(zf, f"{IMAGES_KEY}.npy")
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"{what} {path!r} is not a readable .npz file ({e})") from None
  except ValueError as e:
    if str(e).startswith(what):
      raise
    raise ValueError(f"{what} {path!r}: '{IMAGES_KEY}' is not a readable array ({e})") from None
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1 or fortran:
    raise ValueError(
      f"{what} {path!r}: '{IMAGES_KEY}' must be uint8 images [N, H, W, 3] in C order, got {dtype} {tuple(shape)}"
    )
  return ImageBatch(path, tuple(int(s) for s in shape), keys)


def read_batches(batch: ImageBatch, batch_size: int) -> Iterator[np.ndarray]:
  """Yields consecutive uint8 [<= batch_size, H, W, 3] slices of 'arr_0', streaming from the file."""
  n, rest = batch.shape[0], batch.shape[1:]
  per_image = int(np.prod(rest))
  with zipfile.ZipFile(batch.path) as zf, zf.open(f"{IMAGES_KEY}.npy") as f:
    _read_header(f)
    for start in range(0, n, batch_size):
      count = min(batch_size, n - start)
      data = f.read(count * per_image)
      if len(data) != count * per_image:
        raise ValueError(f"{batch.path!r}: '{IMAGES_KEY}' ends after {start + len(data) // per_image} of {n} images")
      yield np.frombuffer(data, np.uint8).reshape(count, *rest)


def reference_statistics(batch: ImageBatch) -> dict[str, np.ndarray] | None:
  """{'mu', 'sigma', 'mu_s', 'sigma_s'} of a reference batch, or None if it has no 'mu' (statistics are
  then computed from its images). ValueError if 'mu' is present and any of the four is missing or mis-shaped."""
  if "mu" not in batch.keys:
    return None
  missing = [k for k in STAT_SHAPES if k not in batch.keys]
  if missing:
    raise ValueError(f"reference batch {batch.path!r} has 'mu' but lacks {missing}")
  try:
    with np.load(batch.path) as data:
      stats = {k: np.asarray(data[k]) for k in STAT_SHAPES}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"reference batch {batch.path!r}: its statistics cannot be read ({e})") from None
  for k, want in STAT_SHAPES.items():
    if stats[k].shape != want or not np.issubdtype(stats[k].dtype, np.floating):
      raise ValueError(
        f"reference batch {batch.path!r}: '{k}' must be a float array {want}, got {stats[k].dtype} {stats[k].shape}"
      )
    if not np.isfinite(stats[k]).all():
      raise ValueError(f"reference batch {batch.path!r}: '{k}' holds NaN or Inf")
  return stats


def file_digest(path: str, chunk: int = 1 << 24) -> str:
  """sha256 hex digest of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()
