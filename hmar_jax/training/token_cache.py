"""The frozen tokenizer of the transformer tasks, and the token maps of the training images, cached.

Next-scale and masked training read token maps, not images: the training images are tokenised
once by the frozen VQVAE and cached (WORKDIR/tokens.npz, or config.data.tokens_cache to share one
cache between runs). The cache is keyed on the tokenizer's weights (a hash of their bytes) and the
data config, so a tokenizer retrained in place, or other data, makes a new cache rather than
reusing a stale one. With several processes each tokenises its share of the images
(examples p, p + P, ...) into a part file; process 0 joins the parts.
"""

from __future__ import annotations

import hashlib
import json
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
from hmar_jax.data.sources import ImageFolder, tfds_source
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
) -> tuple[np.ndarray, np.ndarray]:
  """Token maps of source[indices] (all when None): (tokens (N, L) int32, labels (N,) int32).

  Unreadable images raise (the cache must hold every example it claims to).
  """
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  encode = _encoder(vqvae)
  ds = grain.MapDataset.source(_Subset(source, indices)).batch(batch_size, drop_remainder=False)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  tokens, labels = [], []
  with tqdm(total=len(indices), desc=desc, unit="img", dynamic_ncols=True, disable=not show_progress) as bar:
    for batch in ds:
      u8 = np.asarray(batch["image"], np.uint8)
      n = u8.shape[0]
      if n < batch_size:  # one compiled shape: pad the last batch
        u8 = np.concatenate([u8, np.zeros((batch_size - n,) + u8.shape[1:], np.uint8)])
      tokens.append(np.asarray(encode(u8))[:n])
      labels.append(np.asarray(batch["label"], np.int32))
      bar.update(n)
  return np.concatenate(tokens), np.concatenate(labels)


class _Subset:
  def __init__(self, source, indices):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


def cache_key(data: ml_collections.ConfigDict, fingerprint: str) -> str:
  fields = {
    k: v
    for k, v in data.to_dict().items()
    if k in ("source", "path", "name", "split", "data_dir", "num_examples", "num_classes", "seed")
  }
  return hashlib.sha256(
    json.dumps({"data": fields, "tokenizer": fingerprint}, sort_keys=True, default=str).encode()
  ).hexdigest()


def cached_tokens(config: ml_collections.ConfigDict, workdir: str, vqvae) -> dict[str, np.ndarray]:
  """{'indices': (N, L) int32, 'labels': (N,) int32} of the training images, tokenised once.

  The cache file is config.data.tokens_cache, or WORKDIR/tokens.npz; a file with another key (other
  tokenizer weights or data) is recomputed and replaced. Collective with several processes.
  """
  data = config.data
  key = cache_key(data, tokenizer_fingerprint(vqvae))
  path = data.tokens_cache or os.path.join(workdir, "tokens.npz")
  cached = _read(path, key)
  if cached is not None:
    return cached
  source = image_source(data, vqvae.image_size)
  n = len(source)
  if data.source != "procedural" and data.num_examples:
    n = min(n, int(data.num_examples))
  p, count = jax.process_index(), jax.process_count()
  mine = np.arange(p, n, count)
  tokens, labels = tokenize_source(
    vqvae, source, batch_size=int(data.tokenize_batch_size), indices=mine, show_progress=p == 0
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if count == 1:
    _write(path, key, tokens, labels)
    return {"indices": tokens, "labels": labels}
  part = f"{path}.part{p}of{count}.npz"
  _write(part, key, tokens, labels)
  multihost_utils.sync_global_devices("token cache parts written")
  if p == 0:
    all_tokens = np.zeros((n,) + tokens.shape[1:], np.int32)
    all_labels = np.zeros((n,), np.int32)
    for q in range(count):
      got = _read(f"{path}.part{q}of{count}.npz", key)
      all_tokens[q::count], all_labels[q::count] = got["indices"], got["labels"]
    _write(path, key, all_tokens, all_labels)
  multihost_utils.sync_global_devices("token cache joined")
  os.remove(part)
  return _read(path, key)


def _read(path: str, key: str) -> dict[str, np.ndarray] | None:
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    if str(f["key"]) != key:
      return None
    return {"indices": f["indices"], "labels": f["labels"]}


def _write(path: str, key: str, tokens: np.ndarray, labels: np.ndarray) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, indices=tokens, labels=labels, key=np.asarray(key))
  os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
