"""The frozen tokenizer of the transformer tasks, and the token maps of the training images, cached.

Next-scale and masked training read token maps, not images: the training images (center crops,
the evaluation transform) are tokenised once by the frozen VQVAE into a cache directory
(config.data.tokens_cache, default WORKDIR/tokens; another run's cache may be named to share it):

  DIR/<key16>-<start>-<stop>.npy   one chunk: images [start, stop) of the source, those readable,
                                   as a structured array of rows (tokens (L,) uint16 - int32 when the
                                   vocabulary exceeds 65536 -, label int32, position int64)
  DIR/manifest.json                written last: the key, the chunk files, the image counts

Each chunk file is written atomically (a temporary file, then a rename) as soon as it is tokenised,
so an interrupted run resumes: the chunks on disk are kept and only the missing ones are tokenised.
The manifest marks the cache complete. Readers memory-map the chunks (TokenCacheSource): nothing
is concatenated in memory.

The cache is keyed on the tokenizer's weights (a hash of their bytes), the data config and, for an
image folder, its files (names, sizes, modification times): a tokenizer retrained in place, other
data, or images added, removed or replaced make a new cache rather than reusing a stale one. An
image that cannot be decoded is left out, named in a warning and counted (the count is kept in the
manifest and reported whenever the cache is used); a run does not stop on it.

With several processes the missing chunks are dealt out round-robin; each process encodes its
chunks with the batch split over its local devices; process 0 writes the manifest. Chunks do not
depend on the number of processes or devices, so a run may resume on another number of either.

The chunked machinery (CacheKind, ShardedEncoder with any encoding function, encode_source,
build_chunks, ChunkCacheSource) is shared with the KL-VAE latent cache of MAR / Hi-MAR
(latent_cache.py), whose chunk files carry their own suffix so neither cache touches the other's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from hmar_jax.data import from_config
from hmar_jax.data.sources import CorruptImageError, ImageFolder
from hmar_jax.parallel import batch_sharding, make_mesh, replicated
from hmar_jax.tokenizer import vqvae as vqvae_lib
from hmar_jax.training.trees import flatten

MANIFEST = "manifest.json"
CACHE_FORMAT = 2  # the directory of chunks (1 was a single tokens.npz)


@dataclasses.dataclass(frozen=True)
class CacheKind:
  """What a chunked cache holds: its name in messages, its progress verb, its manifest 'format' and
  its chunk files' suffix. A chunk file is <16 hex digits of the key>-<start>-<stop><suffix>: the
  source range [start, stop) it covers."""

  what: str
  verb: str
  format: int | str
  suffix: str

  def chunk_name(self, key: str, start: int, stop: int) -> str:
    return f"{key[:16]}-{start:010d}-{stop:010d}{self.suffix}"

  def is_chunk(self, name: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{16}-\d{10}-\d{10}" + re.escape(self.suffix), name) is not None

  def is_leftover(self, name: str) -> bool:
    """A temporary file of a chunk write that was killed (see _write_atomically)."""
    return re.fullmatch(r"[0-9a-f]{16}-\d{10}-\d{10}" + re.escape(self.suffix) + r"\.tmp[0-9]+\.npy", name) is not None


TOKENS = CacheKind(what="token cache", verb="tokenising", format=CACHE_FORMAT, suffix=".npy")


def load_tokenizer(config: ml_collections.ConfigDict):
  """The frozen VQVAE of config.tokenizer: a checkpoint directory, or a seeded random init if ''."""
  ckpt = config.tokenizer.checkpoint
  if ckpt:
    return vqvae_lib.load_vqvae(ckpt)
  # A random tokenizer (smoke tests): one compiled init, drawn with the 'rbg' PRNG (compiles
  # several times faster than threefry for ~100 tensors).
  key = jax.random.key(int(config.tokenizer.seed), impl="rbg")
  return nnx.jit(lambda: vqvae_lib.VQVAE(config.tokenizer.config, rngs=nnx.Rngs(key)))()


def weights_fingerprint(config: Mapping, variables: Mapping) -> str:
  """sha256 of an architecture (a JSON-able mapping) and every variable's name and bytes."""
  h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
  flat = flatten(variables)
  for name in sorted(flat):
    h.update(name.encode())
    h.update(np.ascontiguousarray(np.asarray(flat[name])).tobytes())
  return h.hexdigest()


def tokenizer_fingerprint(vqvae) -> str:
  """sha256 of the tokenizer's architecture and every variable's bytes (what the cache is keyed on)."""
  return weights_fingerprint(vqvae.config, nnx.to_pure_dict(nnx.state(vqvae, vqvae_lib.CHECKPOINT_VARIABLES)))


def image_source(data: ml_collections.ConfigDict, image_size: int):
  """The grain source of config.data (procedural, folder or tfds), center-cropped: what is tokenised."""
  return from_config.image_source(data, image_size, crop="center")


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 while every code fits (vocabulary <= 65536: half the disk of int32), else int32."""
  return np.dtype(np.uint16) if int(vocab_size) <= 1 << 16 else np.dtype(np.int32)


def _row_dtype(length: int, vocab_size: int) -> np.dtype:
  return np.dtype([("tokens", token_dtype(vocab_size), (int(length),)), ("label", "<i4"), ("position", "<i8")])


def _flat_token_maps(vqvae, images: jax.Array) -> jax.Array:
  """(B, S, S, 3) in [-1, 1] -> (B, L) int32: the token maps of every scale, flattened and joined."""
  maps = vqvae.encode_indices(images)
  return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1).astype(jnp.int32)


class ShardedEncoder:
  """Encodings of uint8 image batches, each batch split over this process's local devices.

  __call__((n, S, S, 3) uint8) -> fn(model, images in [-1, 1]) cut to the n images: by default the
  VQVAE's token maps (n, L) int32; fn may return any tree of batch-leading arrays (numpy out).
  n <= batch_size. Every call runs one compiled shape: the batch is padded to batch_size rounded up
  to a multiple of the local device count.
  """

  def __init__(self, model, batch_size: int, fn: Callable | None = None):
    fn = fn or _flat_token_maps
    devices = jax.local_devices()
    # The local devices as a (data, 1, 1) mesh; it is also set as the context mesh of each call, so
    # that a trainer's mesh over other devices (set around the task's data loading) does not apply.
    self.mesh = make_mesh((len(devices), 1, 1), devices)
    self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
    self._data = batch_sharding(self.mesh, 4)
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, replicated(self.mesh))  # replicated weights

    @jax.jit
    def encode(state, images_uint8):
      x = images_uint8.astype(jnp.float32) * (2.0 / 255.0) - 1.0
      return fn(nnx.merge(graphdef, state), x)

    self._encode = encode

  def __call__(self, images_uint8: np.ndarray):
    n = images_uint8.shape[0]
    if n > self.batch_size:
      raise ValueError(f"ShardedEncoder: a batch of {n} exceeds its batch size {self.batch_size}")
    u8 = np.asarray(images_uint8, np.uint8)
    if n < self.batch_size:  # one compiled shape: pad the last batch
      u8 = np.concatenate([u8, np.zeros((self.batch_size - n,) + u8.shape[1:], np.uint8)])
    with jax.set_mesh(self.mesh):
      out = self._encode(self._state, jax.device_put(u8, self._data))
      return jax.tree.map(lambda a: np.asarray(a)[:n], out)


def encode_source(
  encoder: ShardedEncoder,
  source,
  indices: np.ndarray,
  *,
  image_size: int,
  progress: tqdm,
  what: str = "cache",
):
  """The encoder's outputs for the readable images of source[indices] (at least one index).

  Returns (outputs: the encoder's tree of (K, ...) arrays, labels (K,) int32, kept (K,) int64): kept
  lists the source indices encoded, in order; the others could not be read (CorruptImageError,
  OSError), each named in a warning (saying they are left out of `what`). progress: advanced by the
  images read.
  """
  indices = np.asarray(indices)
  ds = grain.MapDataset.source(_Readable(_Subset(source, indices), int(image_size), what))
  ds = ds.batch(encoder.batch_size, drop_remainder=False)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  outputs, labels, ok = [], [], []
  for batch in ds:
    u8 = np.asarray(batch["image"], np.uint8)
    outputs.append(encoder(u8))
    labels.append(np.asarray(batch["label"], np.int32))
    ok.append(np.asarray(batch["readable"], bool))
    progress.update(u8.shape[0])
  ok = np.concatenate(ok)
  joined = jax.tree.map(lambda *parts: np.concatenate(parts)[ok], *outputs)
  return joined, np.concatenate(labels)[ok], indices[ok].astype(np.int64)


def tokenize_source(
  vqvae,
  source,
  *,
  batch_size: int = 64,
  indices: np.ndarray | None = None,
  desc: str = "tokenising",
  show_progress: bool = True,
  encoder: ShardedEncoder | None = None,
  progress: tqdm | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token maps of the readable images of source[indices] (all when None).

  Returns (tokens (K, L) int32, labels (K,) int32, kept (K,) int64): kept lists the source indices
  tokenised, in order; the others could not be read (CorruptImageError, OSError), each named in a
  warning. K = len(indices) when every image is readable. encoder: reuse a ShardedEncoder (its batch
  size wins); progress: a progress bar to advance instead of a new one.
  """
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  if not len(indices):
    length = sum(p * p for p in vqvae.quantizer.patch_nums)
    return np.zeros((0, length), np.int32), np.zeros((0,), np.int32), np.zeros((0,), np.int64)
  encoder = encoder or ShardedEncoder(vqvae, batch_size)
  bar = progress or tqdm(total=len(indices), desc=desc, unit="img", dynamic_ncols=True, disable=not show_progress)
  try:
    return encode_source(encoder, source, indices, image_size=int(vqvae.image_size), progress=bar, what=TOKENS.what)
  finally:
    if progress is None:
      bar.close()


class _Subset:
  def __init__(self, source, indices):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


class _Readable:
  """Records gain 'readable' (bool); an unreadable image becomes a black placeholder marked False
  (encoded with its batch, then dropped), so one bad file does not stop the encoding."""

  def __init__(self, source, image_size: int, what: str):
    self._source, self._size, self._what = source, image_size, what

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    try:
      record = dict(self._source[i])
    except (CorruptImageError, OSError) as e:
      logging.warning("leaving an unreadable image out of the %s: %s", self._what, e)
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


def data_fields(data: ml_collections.ConfigDict) -> dict:
  """The settings of config.data that choose the images (what a cache is keyed on)."""
  return {
    k: v
    for k, v in data.to_dict().items()
    if k in ("source", "path", "name", "split", "data_dir", "num_examples", "num_classes", "seed")
  }


def cache_key(data: ml_collections.ConfigDict, fingerprint: str, files: str = "", **extra) -> str:
  """The cache's key: the data settings, the encoder's fingerprint, the folder's file digest and any
  `extra` JSON-able fields (none for the token cache)."""
  fields = {"data": data_fields(data), "tokenizer": fingerprint, "files": files, **extra}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def keyed_source(data: ml_collections.ConfigDict, image_size: int):
  """(the source if it had to be opened for the key, else None; the folder's file digest or '').

  A folder is listed even when the cache exists (its files are part of the key); other sources are
  opened only to encode (a cache can be used where, say, tfds is not installed)."""
  source = image_source(data, image_size) if data.source == "folder" else None
  return source, (folder_digest(source) if source is not None else "")


def num_images(data: ml_collections.ConfigDict, source) -> int:
  """How many images of `source` a cache covers: all, or the first config.data.num_examples (> 0) of
  a folder or tfds source (a procedural source has exactly num_examples)."""
  n = len(source)
  if data.source != "procedural" and data.num_examples:
    n = min(n, int(data.num_examples))
  return n


def report_unreadable(cached: ChunkCacheSource, directory: str) -> None:
  if cached.unreadable:
    logging.warning(
      "%d of the %d training images could not be read and are not in the %s %s (named in the "
      "warnings when it was built); training uses the other %d",
      cached.unreadable,
      cached.unreadable + len(cached),
      cached.kind.what,
      directory,
      len(cached),
    )


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The token cache directory: config.data.tokens_cache, or WORKDIR/tokens."""
  return config.data.tokens_cache or os.path.join(workdir, "tokens")


def cached_tokens(config: ml_collections.ConfigDict, workdir: str, vqvae) -> TokenCacheSource:
  """The token maps of the readable training images, tokenised once (see the module docstring).

  Returns a TokenCacheSource: record i = {'indices': (L,) int32, 'labels': () int32};
  `.unreadable` counts the images left out. A cache with another key (other tokenizer weights,
  data or files) is rebuilt; an interrupted build resumes. Collective with several processes.
  """
  data = config.data
  source, files = keyed_source(data, vqvae.image_size)
  key = cache_key(data, tokenizer_fingerprint(vqvae), files)
  directory = cache_dir(config, workdir)
  cached = TokenCacheSource.open(directory, key)
  if cached is None:
    source = source if source is not None else image_source(data, vqvae.image_size)
    cached = build_cache(
      directory,
      key,
      source,
      vqvae,
      num_images=num_images(data, source),
      chunk_size=int(data.tokens_chunk_size),
      batch_size=int(data.tokenize_batch_size),
    )
  report_unreadable(cached, directory)
  return cached


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def build_chunks(
  kind: CacheKind,
  directory: str,
  key: str,
  source,
  *,
  num_images: int,
  chunk_size: int,
  image_size: int,
  make_encoder: Callable[[], ShardedEncoder],
  to_rows: Callable[[object, np.ndarray, np.ndarray], np.ndarray],
  manifest: Mapping | None = None,
  show_progress: bool = True,
) -> None:
  """Encodes source[0 : num_images] into `directory`, chunk by chunk, keeping chunks already there.

  Chunk c covers images [c * chunk_size, (c + 1) * chunk_size); the chunks whose files are missing
  are dealt out to the processes round-robin, each encoded by make_encoder()'s encoder and stored as
  to_rows(outputs, labels, kept) (a structured array, one row per readable image). Process 0 then
  writes the manifest (with the extra `manifest` fields) and removes `kind`'s files of other keys.
  Collective with several processes.
  """
  p, count = jax.process_index(), jax.process_count()
  os.makedirs(directory, exist_ok=True)
  ranges = [(s, min(s + chunk_size, num_images)) for s in range(0, num_images, chunk_size)]
  missing = [r for r in ranges if not os.path.exists(os.path.join(directory, kind.chunk_name(key, *r)))]
  _sync(f"{kind.what} listed")  # every process lists the chunks before any is written
  mine = missing[p::count]
  if mine:
    encoder = make_encoder()
    total = sum(stop - start for start, stop in mine)
    done = num_images - sum(stop - start for start, stop in missing)
    logging.info(
      "%s %d images into %s (%d chunks; %d images already there)", kind.verb, total, directory, len(mine), done
    )
    with tqdm(total=total, desc=kind.verb, unit="img", dynamic_ncols=True, disable=not show_progress) as bar:
      for start, stop in mine:
        outputs, labels, kept = encode_source(
          encoder, source, np.arange(start, stop), image_size=image_size, progress=bar, what=kind.what
        )
        rows = to_rows(outputs, labels, kept)
        _write_atomically(os.path.join(directory, kind.chunk_name(key, start, stop)), rows)
  _sync(f"{kind.what} chunks written")
  if p == 0:
    _write_manifest(kind, directory, key, ranges, num_images, chunk_size, dict(manifest or {}))
  _sync(f"{kind.what} complete")


def build_cache(
  directory: str,
  key: str,
  source,
  vqvae,
  *,
  num_images: int,
  chunk_size: int,
  batch_size: int,
  show_progress: bool = True,
) -> TokenCacheSource:
  """Tokenises source[0 : num_images] into `directory`, chunk by chunk, keeping chunks already there
  (see build_chunks). Collective with several processes; returns the finished cache."""
  vocab = vqvae.config["vocab_size"]
  row = _row_dtype(sum(pn * pn for pn in vqvae.quantizer.patch_nums), vocab)

  def to_rows(tokens, labels, kept):
    rows = np.empty(len(kept), row)
    rows["tokens"], rows["label"], rows["position"] = tokens, labels, kept
    return rows

  build_chunks(
    TOKENS,
    directory,
    key,
    source,
    num_images=num_images,
    chunk_size=chunk_size,
    image_size=int(vqvae.image_size),
    make_encoder=lambda: ShardedEncoder(vqvae, batch_size),
    to_rows=to_rows,
    manifest={"token_dtype": str(token_dtype(vocab)) if num_images else ""},
    show_progress=show_progress,
  )
  return TokenCacheSource.open_built(directory, key, num_images)


def _write_atomically(path: str, rows: np.ndarray) -> None:
  tmp = f"{path}.tmp{os.getpid()}.npy"
  np.save(tmp, rows)
  os.replace(tmp, path)  # readers see no file or the whole chunk


def _write_manifest(
  kind: CacheKind, directory: str, key: str, ranges, num_images: int, chunk_size: int, extra: dict
) -> None:
  chunks = []
  for start, stop in ranges:
    name = kind.chunk_name(key, start, stop)
    rows = np.load(os.path.join(directory, name), mmap_mode="r")
    chunks.append({"file": name, "start": start, "stop": stop, "rows": len(rows)})
  readable = sum(c["rows"] for c in chunks)
  manifest = {
    "format": kind.format,
    "key": key,
    "images": num_images,
    "readable": readable,
    "unreadable": num_images - readable,
    "chunk_size": chunk_size,
    **extra,
    "chunks": chunks,
  }
  tmp = os.path.join(directory, f"{MANIFEST}.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(directory, MANIFEST))
  keep = {c["file"] for c in chunks}
  for name in os.listdir(directory):  # chunks of other keys or chunk sizes, and leftovers of killed writes
    if (kind.is_chunk(name) and name not in keep) or kind.is_leftover(name):
      os.remove(os.path.join(directory, name))


def read_manifest(directory: str) -> dict | None:
  """The manifest of a cache directory, or None when there is none (or it cannot be parsed)."""
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) else None


class ChunkCacheSource:
  """Random-access (grain) source over a finished chunked cache; the chunks are memory-mapped.

  Subclasses set `kind` and turn a stored row into a record (__getitem__). Picklable (for loader
  worker processes): each process maps the chunk files itself.
  """

  kind: CacheKind  # set by each subclass

  def __init__(self, directory: str, manifest: dict):
    self.directory = directory
    self.key = manifest["key"]
    self.unreadable = int(manifest["unreadable"])
    chunks = [c for c in manifest["chunks"] if c["rows"]]
    self._files = [c["file"] for c in chunks]
    self._offsets = np.cumsum([0] + [c["rows"] for c in chunks])
    self._maps = None
    self._lock = threading.Lock()

  @classmethod
  def open(cls, directory: str, key: str | None = None):
    """The cache in `directory` if it is complete and has this key (any key when None), else None."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("format") != cls.kind.format:
      return None
    if key is not None and manifest.get("key") != key:
      return None
    if not all(os.path.exists(os.path.join(directory, c["file"])) for c in manifest["chunks"]):
      return None
    return cls(directory, manifest)

  @classmethod
  def open_built(cls, directory: str, key: str, num_images: int):
    """The cache just built in `directory`: an error if it is incomplete or holds no image."""
    cached = cls.open(directory, key)
    if cached is None:
      raise RuntimeError(
        f"the {cls.kind.what} {directory!r} is incomplete after {cls.kind.verb} (another run writing to it?)"
      )
    if not len(cached):
      raise ValueError(f"none of the {num_images} training images could be read (see the warnings naming them)")
    return cached

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _chunks(self) -> list[np.ndarray]:
    if self._maps is None:
      with self._lock:
        if self._maps is None:
          self._maps = [np.load(os.path.join(self.directory, f), mmap_mode="r") for f in self._files]
    return self._maps

  def row(self, index: int):
    """The stored row of record `index` (a structured numpy scalar, memory-mapped)."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.kind.what} index {index} out of range [0, {len(self)})")
    c = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self._chunks()[c][index - self._offsets[c]]

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._maps, self._lock = None, threading.Lock()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.directory!r}, key={self.key[:16]}, len={len(self)})"


class TokenCacheSource(ChunkCacheSource):
  """Random-access (grain) source over a finished token cache; the chunks are memory-mapped.

  Record i = {'indices': (L,) int32, 'labels': () int32}, in source order (unreadable images left
  out). Picklable (for loader worker processes): each process maps the chunk files itself.
  """

  kind = TOKENS

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row = self.row(index)
    return {"indices": row["tokens"].astype(np.int32), "labels": np.int32(row["label"])}

  def arrays(self) -> dict[str, np.ndarray]:
    """{'indices': (N, L) int32, 'labels': (N,) int32, 'positions': (N,) int64 source indices}, in memory
    (for inspection and small caches; training reads records)."""
    chunks = self._chunks()
    if not chunks:
      return {
        "indices": np.zeros((0, 0), np.int32),
        "labels": np.zeros(0, np.int32),
        "positions": np.zeros(0, np.int64),
      }
    return {
      "indices": np.concatenate([c["tokens"] for c in chunks]).astype(np.int32),
      "labels": np.concatenate([c["label"] for c in chunks]).astype(np.int32),
      "positions": np.concatenate([c["position"] for c in chunks]).astype(np.int64),
    }
