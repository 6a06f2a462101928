"""The frozen tokenizer of the transformer tasks, and the token maps of the training images, cached.

Next-scale and masked training read token maps, not images: the training images are tokenised
once by the frozen VQVAE and cached (WORKDIR/tokens.npz, or config.data.tokens_cache to share one
cache between runs). The cache is keyed on the tokenizer's weights (a hash of their bytes), the
data config and, for an image folder, its files (names, sizes, modification times), so a tokenizer
retrained in place, other data, or images added, removed or replaced make a new cache rather than
reusing a stale one. An image that cannot be decoded is left out of the cache, named in a warning
and counted (the count is kept in the cache file and reported again whenever it is used); a run
does not stop on it. With several processes each tokenises its share of the images (examples p,
p + P, ...) into a part file; process 0 joins the parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from hmar_jax.data.procedural import ProceduralShapes
from hmar_jax.data.sources import CorruptImageError, ImageFolder, tfds_source
from hmar_jax.tokenizer import vqvae as vqvae_lib
from hmar_jax.training.trees import flatten


def load_tokenizer(config: ml_collections.ConfigDict):
  """The frozen VQVAE of config.tokenizer: a checkpoint directory, or a seeded random init if ''."""
  ckpt = config.tokenizer.checkpoint
  if ckpt:
    return vqvae_lib.load_vqvae(ckpt)
  # A random tokenizer (smoke tests): one compiled init, drawn with the 'rbg' PRNG (compiles
  # several times faster than threefry for ~100 tensors).
  key = jax.random.key(int(config.tokenizer.seed), impl="rbg")
  return nnx.jit(lambda: vqvae_lib.VQVAE(config.tokenizer.config, rngs=nnx.Rngs(key)))()


def tokenizer_fingerprint(vqvae) -> str:
  """sha256 of the tokenizer's architecture and every variable's bytes (what the cache is keyed on)."""
  h = hashlib.sha256(json.dumps(vqvae.config, sort_keys=True, default=str).encode())
  flat = flatten(nnx.to_pure_dict(nnx.state(vqvae, vqvae_lib.CHECKPOINT_VARIABLES)))
  for name in sorted(flat):
    h.update(name.encode())
    h.update(np.ascontiguousarray(np.asarray(flat[name])).tobytes())
  return h.hexdigest()


def image_source(data: ml_collections.ConfigDict, image_size: int):
  """The grain source of config.data: procedural (built in), folder or tfds."""
  if data.source == "procedural":
    return ProceduralShapes(
      int(data.num_examples), int(image_size), seed=int(data.seed), num_classes=int(data.num_classes)
    )
  if data.source == "folder":
    return ImageFolder(data.path, int(image_size))
  return tfds_source(data.name, data.split, int(image_size), data_dir=data.data_dir or None)


def _encoder(vqvae):
  graphdef, state = nnx.split(vqvae)

  @jax.jit
  def encode(state, images_uint8):
    x = images_uint8.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    maps = nnx.merge(graphdef, state).encode_indices(x)
    return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1).astype(jnp.int32)

  return lambda images: encode(state, images)


def tokenize_source(
  vqvae,
  source,
  *,
  batch_size: int = 64,
  indices: np.ndarray | None = None,
  desc: str = "tokenising",
  show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token maps of the readable images of source[indices] (all when None).

  Returns (tokens (K, L) int32, labels (K,) int32, kept (K,) int64): kept lists the source indices
  tokenised, in order; the others could not be read (CorruptImageError, OSError), each named in a
  warning. K = len(indices) when every image is readable.
  """
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  encode = _encoder(vqvae)
  size = int(vqvae.image_size)
  ds = grain.MapDataset.source(_Readable(_Subset(source, indices), size)).batch(batch_size, drop_remainder=False)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  tokens, labels, ok = [], [], []
  with tqdm(total=len(indices), desc=desc, unit="img", dynamic_ncols=True, disable=not show_progress) as bar:
    for batch in ds:
      u8 = np.asarray(batch["image"], np.uint8)
      n = u8.shape[0]
      if n < batch_size:  # one compiled shape: pad the last batch
        u8 = np.concatenate([u8, np.zeros((batch_size - n,) + u8.shape[1:], np.uint8)])
      tokens.append(np.asarray(encode(u8))[:n])
      labels.append(np.asarray(batch["label"], np.int32))
      ok.append(np.asarray(batch["readable"], bool))
      bar.update(n)
  ok = np.concatenate(ok)
  return np.concatenate(tokens)[ok], np.concatenate(labels)[ok], indices[ok].astype(np.int64)


class _Subset:
  def __init__(self, source, indices):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


class _Readable:
  """Records gain 'readable' (bool); an unreadable image becomes a black placeholder marked False
  (tokenised with its batch, then dropped), so one bad file does not stop the tokenising."""

  def __init__(self, source, image_size: int):
    self._source, self._size = source, image_size

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    try:
      record = dict(self._source[i])
    except (CorruptImageError, OSError) as e:
      logging.warning("leaving an unreadable image out of the token cache: %s", e)
      return {"image": np.zeros((self._size, self._size, 3), np.uint8), "label": np.int32(0), "readable": False}
    record["readable"] = True
    return record


def folder_digest(source: ImageFolder) -> str:
  """sha256 of an image folder's file list: relative paths, sizes and modification times."""
  h = hashlib.sha256()
  for path, label in source.samples:
    st = os.stat(path)
    h.update(f"{os.path.relpath(path, source.root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def cache_key(data: ml_collections.ConfigDict, fingerprint: str, files: str = "") -> str:
  """The cache's key: the data settings, the tokenizer fingerprint and the folder's file digest."""
  fields = {
    k: v
    for k, v in data.to_dict().items()
    if k in ("source", "path", "name", "split", "data_dir", "num_examples", "num_classes", "seed")
  }
  return hashlib.sha256(
    json.dumps({"data": fields, "tokenizer": fingerprint, "files": files}, sort_keys=True, default=str).encode()
  ).hexdigest()


def cached_tokens(config: ml_collections.ConfigDict, workdir: str, vqvae) -> dict[str, np.ndarray]:
  """{'indices': (K, L) int32, 'labels': (K,) int32} of the readable training images, tokenised once;
  'unreadable': int, how many images were left out (K = images - unreadable).

  The cache file is config.data.tokens_cache, or WORKDIR/tokens.npz; a file with another key (other
  tokenizer weights, data or files) is recomputed and replaced. Collective with several processes.
  """
  data = config.data
  # A folder is listed even when the cache exists (its files are part of the key); other sources are
  # opened only to tokenise (a cache can be used where, say, tfds is not installed).
  source = image_source(data, vqvae.image_size) if data.source == "folder" else None
  key = cache_key(data, tokenizer_fingerprint(vqvae), folder_digest(source) if source is not None else "")
  path = data.tokens_cache or os.path.join(workdir, "tokens.npz")
  cached = _read(path, key)
  if cached is None:
    source = source if source is not None else image_source(data, vqvae.image_size)
    cached = _build(path, key, data, source, vqvae)
  if cached["unreadable"]:
    logging.warning(
      "%d of the %d training images could not be read and are not in the token cache %s (named in the "
      "warnings when it was built); training uses the other %d",
      cached["unreadable"],
      cached["unreadable"] + len(cached["labels"]),
      path,
      len(cached["labels"]),
    )
  return cached


def _build(path: str, key: str, data, source, vqvae) -> dict:
  n = len(source)
  if data.source != "procedural" and data.num_examples:
    n = min(n, int(data.num_examples))
  p, count = jax.process_index(), jax.process_count()
  mine = np.arange(p, n, count)
  tokens, labels, kept = tokenize_source(
    vqvae, source, batch_size=int(data.tokenize_batch_size), indices=mine, show_progress=p == 0
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if count == 1:
    _check_some_readable(len(kept), n)
    _write(path, key, tokens, labels, kept, n)
    return _read(path, key)
  part = f"{path}.part{p}of{count}.npz"
  _write(part, key, tokens, labels, kept, len(mine))
  multihost_utils.sync_global_devices("token cache parts written")
  if p == 0:
    parts = [_read(f"{path}.part{q}of{count}.npz", key, with_positions=True) for q in range(count)]
    positions = np.concatenate([got["positions"] for got in parts])
    order = np.argsort(positions, kind="stable")  # back to the source order
    all_tokens = np.concatenate([got["indices"] for got in parts])[order]
    all_labels = np.concatenate([got["labels"] for got in parts])[order]
    # (No check that any image was readable here: the other processes wait below; with too few
    # examples every process stops at the loader's check, naming the count.)
    _write(path, key, all_tokens, all_labels, positions[order], n)
  multihost_utils.sync_global_devices("token cache joined")
  os.remove(part)
  return _read(path, key)


def _check_some_readable(readable: int, total: int) -> None:
  if not readable:
    raise ValueError(f"none of the {total} training images could be read (see the warnings naming them)")


def _read(path: str, key: str, *, with_positions: bool = False) -> dict | None:
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    if str(f["key"]) != key or "positions" not in f:  # another key, or a cache from before counts were kept
      return None
    out = {"indices": f["indices"], "labels": f["labels"], "unreadable": int(f["total"]) - len(f["positions"])}
    if with_positions:
      out["positions"] = f["positions"]
    return out


def _write(path: str, key: str, tokens, labels, positions, total: int) -> None:
  """positions: the source index of each row; total: how many images were read for it."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, indices=tokens, labels=labels, positions=positions, total=np.int64(total), key=np.asarray(key))
  os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
