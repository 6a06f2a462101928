"""The KL-VAE posterior moments of the training images, cached: MAR / Hi-MAR training without the encoder.

Without a cache (config.data.latents_cache = '', the default) every MAR / Hi-MAR step runs the frozen
KL VAE's encoder on its images. With one ('auto' = WORKDIR/latents, or a directory, which another run
may share), the training images are encoded once, as the official main_cache.py does (LTH14/mar
engine_mar.py cache_latents): per image the posterior's moments (mean | log-variance, before any
sampling, float32) of its centre crop and of that crop flipped left-right. Each step then picks one
of the two per example (the flip drawn from the step key, exactly as the encode-every-step path
draws its flip: the same key gives the same tokens either way), samples the posterior
(mean + exp(0.5 * clip(logvar, -30, 20)) * N(0, 1)) and scales it by the VAE's latent_scale.

Hi-MAR's cache (HiDream-ai/himar engine_mar.py cache_latents) also holds the moments of a low-resolution
view and of its flip; the step picks the low view with the same flip as the full one. Official: the
view is the centre crop resized with F.interpolate(mode='bicubic') (no antialiasing) to
--small_scale pixels; util/loader.py also draws a random 128 px crop of the original image, but
cache_latents discards it (`for samples, _, paths in ...`), so the original image plays no part.
Here too (low_res_images, the filter the task's encode-every-step path uses as well), to
cond_scale * vae_stride pixels; its flip is low_res_images(flip(crop)), as the official
interpolate-then-flip up to rounding.

Layout (token_cache.py's chunked machinery, with its own chunk suffix):

  DIR/<key16>-<start>-<stop>.latents.npy   one chunk: images [start, stop) of the source, those
                                           readable, as rows of: moments, moments_flip (h, w, 2C)
                                           float32 [, low_moments, low_moments_flip (hl, wl, 2C)],
                                           label int32, position int64
  DIR/manifest.json                        written last: the key, what it was made from, the chunks

At 256 px over kl16 (16 x 16 x 32 moments) a row is 64 KiB (80 KiB with Hi-MAR's 8 x 8 low view):
about 84 GB (105 GB) for ImageNet's 1,281,167 images.

Chunks are written atomically, so an interrupted build resumes (only the missing chunks are encoded);
with several processes the chunks are dealt out and each process encodes over its local devices.
The key covers the VAE encoder's weights and architecture (not latent_scale, applied when reading,
nor the decoder), the data settings, an image folder's files, and the views stored. Unlike the token
cache, a directory holding another key's cache (another VAE, other data, MAR's views where Hi-MAR's
are needed), another kind of cache or foreign files is refused with an error naming the difference,
never rebuilt in place: a latent cache takes hours to make, and a mismatch is far more likely a
wrong path than a wish to throw it away (remove the directory to rebuild).

Build ahead of training (the same config and workdir as the training run):

  python -m hmar_jax.cache_latents --config=configs/mar.py:base --workdir=runs/mar_base \\
      --config.tokenizer.checkpoint=checkpoints/kl16 --config.data.latents_cache=auto
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.tokenizer.resize import bicubic_resize
from hmar_jax.training import token_cache
from hmar_jax.training.token_cache import CacheKind, ChunkCacheSource, ShardedEncoder

LATENTS = CacheKind(what="latent cache", verb="encoding", format="hmar_jax.latents/1", suffix=".latents.npy")
VIEWS = ("moments", "moments_flip")
LOW_RES_VIEWS = ("low_moments", "low_moments_flip")
LOW_RES_FILTER = "bicubic"  # what low_res_images does (part of the key)
AUTO = "auto"
# Images per cache file (the work an interrupted build redoes): 128 MiB of kl16 moments at 256 px.
CHUNK_SIZE = 2048
# Images per encoder call and local device (kl16's encoder at 256 px: a few GiB of activations).
BATCH_PER_DEVICE = 16


def low_res_images(images: jax.Array, size: int) -> jax.Array:
  """Hi-MAR's low-resolution view: (B, H, W, 3) in [-1, 1] resized to (B, size, size, 3) as the official
  cache does (HiDream-ai/himar engine_mar.py cache_latents: F.interpolate(mode='bicubic'), no
  antialiasing, no clamp)."""
  return bicubic_resize(images, (int(size), int(size)))


def view_moments(vae, images: jax.Array, low_res_px: int = 0) -> dict[str, jax.Array]:
  """The moments stored per image: (B, H, W, 3) in [-1, 1] -> {'moments', 'moments_flip': (B, h, w, 2C)}
  and, when low_res_px > 0, {'low_moments', 'low_moments_flip': (B, hl, wl, 2C)} (float32)."""
  flipped = images[:, :, ::-1]
  out = {"moments": vae.encode(images), "moments_flip": vae.encode(flipped)}
  if low_res_px:
    out["low_moments"] = vae.encode(low_res_images(images, low_res_px))
    out["low_moments_flip"] = vae.encode(low_res_images(flipped, low_res_px))
  return {k: v.astype(jnp.float32) for k, v in out.items()}


def view_shapes(vae_config: Mapping, low_res_px: int = 0) -> dict[str, tuple[int, int, int]]:
  """{view name: (h, w, 2C)} of the moments cached for a KL VAE of this config."""
  f = 2 ** (len(vae_config["ch_mult"]) - 1)
  c2 = 2 * int(vae_config["embed_dim"])
  size = int(vae_config["image_size"]) // f
  shapes = {name: (size, size, c2) for name in VIEWS}
  if low_res_px:
    shapes.update({name: (int(low_res_px) // f, int(low_res_px) // f, c2) for name in LOW_RES_VIEWS})
  return shapes


def row_dtype(shapes: Mapping[str, tuple[int, ...]]) -> np.dtype:
  return np.dtype(
    [(name, "<f4", tuple(shape)) for name, shape in shapes.items()] + [("label", "<i4"), ("position", "<i8")]
  )


def vae_fingerprint(vae) -> str:
  """sha256 of what the moments depend on: the architecture (less latent_scale) and the encoder's and
  quant_conv's weights."""
  config = {k: v for k, v in vae.config.items() if k != "latent_scale"}
  state = nnx.to_pure_dict(nnx.state(vae))
  return token_cache.weights_fingerprint(config, {k: state[k] for k in ("encoder", "quant_conv")})


def latents_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The latent cache directory of config.data.latents_cache ('auto': WORKDIR/latents), '' when off."""
  setting = config.data.latents_cache
  if not setting:
    return ""
  return os.path.join(workdir, "latents") if setting == AUTO else setting


def _describe(what: Mapping) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in sorted(what.items()))


def check_directory(directory: str, key: str, made_from: Mapping) -> None:
  """Raises ValueError (or FileExistsError) unless `directory` is absent, empty, or holds (part of)
  the latent cache of this key; the message names what differs."""
  if not os.path.exists(directory):
    return
  if not os.path.isdir(directory):
    raise FileExistsError(
      f"the latent cache {directory!r} is a file; config.data.latents_cache names a directory (of chunk files "
      "and a manifest), 'auto' (WORKDIR/latents) or '' (encode every step)"
    )
  names = os.listdir(directory)
  if token_cache.MANIFEST in names:
    manifest = token_cache.read_manifest(directory)
    if manifest is None:
      raise ValueError(f"the latent cache {directory!r} has a manifest.json that cannot be read as JSON")
    fmt = manifest.get("format")
    if fmt == token_cache.TOKENS.format:
      raise ValueError(
        f"{directory!r} is a token cache (a VQVAE's token maps), not a latent cache: name another directory "
        "in config.data.latents_cache"
      )
    if fmt != LATENTS.format:
      raise ValueError(f"{directory!r} is not a latent cache (its manifest.json has format {fmt!r})")
    if manifest.get("key") != key:
      raise ValueError(f"the latent cache {directory!r} {_difference(manifest.get('made_from') or {}, made_from)}")
    return
  ours = [n for n in names if LATENTS.is_chunk(n) or LATENTS.is_leftover(n) or n.startswith(token_cache.MANIFEST)]
  theirs = sorted({n[:16] for n in ours if not n.startswith(token_cache.MANIFEST)} - {key[:16]})
  if theirs:
    raise ValueError(
      f"the latent cache {directory!r} holds the chunks of an unfinished build with another key (another VAE, "
      "other data or other views): finish it with that run's config, or remove the directory to start this one"
    )
  foreign = sorted(set(names) - set(ours))
  if foreign:
    raise ValueError(
      f"{directory!r} holds files that are not a latent cache's ({', '.join(foreign[:3])}"
      f"{' ...' if len(foreign) > 3 else ''}): name a new or empty directory in config.data.latents_cache"
    )


def _difference(theirs: Mapping, ours: Mapping) -> str:
  remedy = "; name another directory in config.data.latents_cache, or remove this one to encode the images again"
  if theirs.get("vae") != ours["vae"]:
    return (
      f"was made by another VAE (encoder fingerprint {str(theirs.get('vae'))[:12]}..., this run's "
      f"{ours['vae'][:12]}...){remedy}"
    )
  if theirs.get("data") != ours["data"] or theirs.get("files") != ours["files"]:
    return (
      f"holds the latents of other images (data {_describe(theirs.get('data') or {})}; this run's "
      f"{_describe(ours['data'])}{'; or the folder files changed' if ours['files'] else ''}){remedy}"
    )
  if theirs.get("views") != ours["views"]:
    return f"holds the views {theirs.get('views')}, this run needs {ours['views']}{remedy}"
  return f"has another key (made from {theirs}, this run's {dict(ours)}){remedy}"


def cached_latents(
  config: ml_collections.ConfigDict, workdir: str, vae, *, low_res_px: int = 0, show_progress: bool = True
) -> LatentCacheSource:
  """The moments of the readable training images (see the module docstring), encoded once.

  config.data.latents_cache must be on ('auto' or a directory). Returns a LatentCacheSource; record i
  = {view name: (h, w, 2C) float32 for VIEWS (and LOW_RES_VIEWS when low_res_px > 0), 'label': ()
  int32}. A missing or unfinished cache is built (resumed); a directory holding anything else is a
  ValueError naming the difference, raised before any image is encoded. Collective with several
  processes.
  """
  directory = latents_dir(config, workdir)
  if not directory:
    raise ValueError("config.data.latents_cache is '' (encode every step): there is no latent cache to read")
  data = config.data
  source, files = token_cache.keyed_source(data, vae.image_size)
  shapes = view_shapes(vae.config, low_res_px)
  views = {name: list(shape) for name, shape in shapes.items()}
  made_from = {
    "vae": vae_fingerprint(vae),
    "data": token_cache.data_fields(data),
    "files": files,
    "views": views,
    "low_res": {"px": int(low_res_px), "filter": LOW_RES_FILTER} if low_res_px else None,
  }
  key = token_cache.cache_key(data, made_from["vae"], files, cache="latents", views=views, low_res=made_from["low_res"])
  check_directory(directory, key, made_from)
  cached = LatentCacheSource.open(directory, key)
  if cached is None:
    source = source if source is not None else token_cache.image_source(data, vae.image_size)
    cached = build_latents(
      directory,
      key,
      source,
      vae,
      num_images=token_cache.num_images(data, source),
      low_res_px=low_res_px,
      made_from=made_from,
      show_progress=show_progress,
    )
  token_cache.report_unreadable(cached, directory)
  return cached


def build_latents(
  directory: str,
  key: str,
  source,
  vae,
  *,
  num_images: int,
  low_res_px: int = 0,
  chunk_size: int = CHUNK_SIZE,
  batch_size: int | None = None,
  made_from: Mapping | None = None,
  show_progress: bool = True,
) -> LatentCacheSource:
  """Encodes source[0 : num_images] (uint8 centre crops) into `directory`, keeping the chunks already
  there (token_cache.build_chunks). batch_size: images per encoder call (default BATCH_PER_DEVICE per
  local device). Collective with several processes; returns the finished cache."""
  shapes = view_shapes(vae.config, low_res_px)
  row = row_dtype(shapes)
  batch = int(batch_size or BATCH_PER_DEVICE * jax.local_device_count())

  def to_rows(moments, labels, kept):
    rows = np.empty(len(kept), row)
    for name in shapes:
      rows[name] = moments[name]
    rows["label"], rows["position"] = labels, kept
    return rows

  token_cache.build_chunks(
    LATENTS,
    directory,
    key,
    source,
    num_images=num_images,
    chunk_size=int(chunk_size),
    image_size=int(vae.image_size),
    make_encoder=lambda: ShardedEncoder(vae, batch, lambda v, x: view_moments(v, x, low_res_px)),
    to_rows=to_rows,
    manifest={"views": list(shapes), "made_from": dict(made_from or {})},
    show_progress=show_progress,
  )
  return LatentCacheSource.open_built(directory, key, num_images)


class LatentCacheSource(ChunkCacheSource):
  """Random-access (grain) source over a finished latent cache; the chunks are memory-mapped.

  Record i = {view name: (h, w, 2C) float32 for each cached view, 'label': () int32}, in source order
  (unreadable images left out). Picklable: each loader worker maps the chunk files itself.
  """

  kind = LATENTS

  def __init__(self, directory: str, manifest: dict):
    super().__init__(directory, manifest)
    self.views = tuple(manifest["views"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row = self.row(index)
    out = {name: np.array(row[name], np.float32) for name in self.views}
    out["label"] = np.int32(row["label"])
    return out

  def arrays(self) -> dict[str, np.ndarray]:
    """Every view (N, h, w, 2C) float32, 'label' (N,) int32 and 'position' (N,) int64 (source indices),
    in memory (for inspection and small caches; training reads records)."""
    chunks = self._chunks()
    names = (*self.views, "label", "position")
    if not chunks:
      return {name: np.zeros((0,)) for name in names}
    return {name: np.concatenate([np.asarray(c[name]) for c in chunks]) for name in names}
