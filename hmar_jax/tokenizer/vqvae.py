"""The multi-scale VQVAE (VAR models/vqvae.py), NHWC, in Flax NNX.

  images (B, H, W, 3) in [-1, 1]
    -> encoder -> quant_conv -> f (B, h, w, Cvae), h = w = patch_nums[-1] = H / 16
    -> MultiScaleQuantizer -> token maps [(B, pn, pn)] and f_hat (B, h, w, Cvae)
    -> post_quant_conv -> decoder -> images (clamped to [-1, 1] outside training)

Build with `VQVAE(config, rngs=nnx.Rngs(0))` from configs/vqvae.py, or load a converted /
trained checkpoint with `load_vqvae(directory)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.tokenizer.blocks import Decoder, Encoder, conv
from hmar_jax.tokenizer.quantizer import CodebookUsage, MultiScaleQuantizer, check_patch_nums

# What a tokenizer checkpoint holds: parameters and the codebook-usage statistics.
CHECKPOINT_VARIABLES = nnx.Any(nnx.Param, CodebookUsage)

# Config fields the architecture needs (configs/vqvae.py).
ARCH_FIELDS = (
  "in_channels",
  "ch",
  "ch_mult",
  "num_res_blocks",
  "dropout",
  "using_sa",
  "using_mid_sa",
  "norm_groups",
  "norm_eps",
  "vocab_size",
  "z_channels",
  "beta",
  "using_znorm",
  "quant_conv_ks",
  "quant_resi",
  "share_quant_resi",
  "default_qresi_counts",
  "patch_nums",
  "image_size",
  "codebook_init",
)


def _get(config: Any, name: str):
  if isinstance(config, Mapping):
    return config[name]
  return getattr(config, name)


def arch_dict(config: Any) -> dict:
  """The architecture fields of a config as a plain JSON-able dict (stored with checkpoints)."""
  out = {}
  for name in ARCH_FIELDS:
    try:
      v = _get(config, name)
    except (KeyError, AttributeError):
      raise ValueError(f"VQVAE config lacks field {name!r} (see configs/vqvae.py)") from None
    out[name] = list(v) if isinstance(v, (tuple, list)) else v
  return out


def validate_config(config: Any) -> dict:
  """Checks a VQVAE config; returns its arch dict. Raises ValueError naming the problem."""
  c = arch_dict(config)
  pns = check_patch_nums(c["patch_nums"])
  ch_mult = tuple(int(m) for m in c["ch_mult"])
  if not ch_mult or any(m <= 0 for m in ch_mult):
    raise ValueError(f"ch_mult must be positive ints, got {c['ch_mult']}")
  down = 2 ** (len(ch_mult) - 1)
  if c["image_size"] != pns[-1] * down:
    raise ValueError(
      f"image_size {c['image_size']} does not fit patch_nums {pns}: the encoder downsamples by "
      f"{down} (len(ch_mult) = {len(ch_mult)}), so the last scale {pns[-1]} needs "
      f"{pns[-1] * down} px images"
    )
  for m in sorted(set((1,) + ch_mult)):
    if (c["ch"] * m) % c["norm_groups"]:
      raise ValueError(f"width ch * {m} = {c['ch'] * m} is not divisible by norm_groups {c['norm_groups']}")
  if c["quant_conv_ks"] % 2 != 1:
    raise ValueError(f"quant_conv_ks must be odd (same padding), got {c['quant_conv_ks']}")
  return c


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class VQVAE(nnx.Module):
  """Encoder + multi-scale quantizer + decoder with the official parameter layout."""

  def __init__(self, config: Any, *, rngs: nnx.Rngs):
    c = validate_config(config)
    self.config = c
    self.image_size = int(c["image_size"])
    enc_dec = dict(
      ch=c["ch"],
      ch_mult=tuple(c["ch_mult"]),
      num_res_blocks=c["num_res_blocks"],
      z_channels=c["z_channels"],
      in_channels=c["in_channels"],
      dropout=c["dropout"],
      using_sa=c["using_sa"],
      using_mid_sa=c["using_mid_sa"],
      norm_groups=c["norm_groups"],
      norm_eps=c["norm_eps"],
    )
    self.encoder = Encoder(**enc_dec, rngs=rngs)
    self.decoder = Decoder(**enc_dec, rngs=rngs)
    self.quantizer = MultiScaleQuantizer(
      vocab_size=c["vocab_size"],
      z_channels=c["z_channels"],
      patch_nums=c["patch_nums"],
      beta=c["beta"],
      using_znorm=c["using_znorm"],
      quant_resi=c["quant_resi"],
      share_quant_resi=c["share_quant_resi"],
      default_qresi_counts=c["default_qresi_counts"],
      codebook_init=c["codebook_init"],
      rngs=rngs,
    )
    self.quant_conv = conv(c["z_channels"], c["z_channels"], c["quant_conv_ks"], rngs=rngs)
    self.post_quant_conv = conv(c["z_channels"], c["z_channels"], c["quant_conv_ks"], rngs=rngs)

  @property
  def patch_nums(self) -> tuple[int, ...]:
    return self.quantizer.patch_nums

  def check_images(self, images: jax.Array) -> None:
    """Raises ValueError unless images is (B, S, S, in_channels) float in [-1, 1] (S = image_size).

    The value range is checked only for concrete arrays (not under jit).
    """
    shape = tuple(getattr(images, "shape", ()))
    s, cin = self.image_size, self.config["in_channels"]
    if len(shape) != 4 or shape[1:] != (s, s, cin):
      hint = " (NCHW? images are NHWC)" if len(shape) == 4 and shape[1] == cin else ""
      raise ValueError(
        f"VQVAE expects images of shape (B, {s}, {s}, {cin}) for patch_nums {self.patch_nums}; got {shape}{hint}"
      )
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")
    if is_concrete(images) and images.size:
      host = np.asarray(images)  # concrete: checked on the host, no tracing
      lo, hi = float(host.min()), float(host.max())
      if not (lo >= -1.001 and hi <= 1.001):  # tolerance for resize overshoot / rounding
        raise ValueError(
          f"images must lie in [-1, 1]; got values in [{lo:.4g}, {hi:.4g}] (map uint8 pixels with x / 127.5 - 1)"
        )

  def encode_features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """images (B, H, W, 3) -> f (B, h, w, Cvae) = quant_conv(encoder(images))."""
    self.check_images(images)
    return self.quant_conv(self.encoder(images, train=train))

  def encode_indices(self, images: jax.Array) -> list[jax.Array]:
    """images (B, H, W, 3) -> [(B, pn, pn) int32] per scale (official img_to_idxBl)."""
    return self.quantizer.encode_indices(self.encode_features(images))

  def encode(self, images: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """images -> (token maps, f_hat (B, h, w, Cvae))."""
    return self.quantizer.encode(self.encode_features(images))

  def indices_to_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
    return self.quantizer.indices_to_fhat(indices)

  def fhat_to_image(self, f_hat: jax.Array) -> jax.Array:
    """f_hat (B, h, w, Cvae) -> images (B, H, W, 3) clamped to [-1, 1] (official fhat_to_img)."""
    self.quantizer.check_features(f_hat)
    return jnp.clip(self.decoder(self.post_quant_conv(f_hat)), -1.0, 1.0)

  def decode_indices(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Token maps -> images (B, H, W, 3) in [-1, 1] (official idxBl_to_img, same_shape, last_one)."""
    return self.fhat_to_image(self.indices_to_fhat(indices))

  def reconstruct(self, images: jax.Array) -> jax.Array:
    """images -> tokenize -> decode, clamped (official img_to_reconstructed_img(last_one=True))."""
    return self.fhat_to_image(self.encode(images)[1])

  def __call__(self, images: jax.Array, *, train: bool = False):
    """Training forward (official VQVAE.forward).

    Returns:
      recon: (B, H, W, 3) unclamped decoder output of the straight-through f_hat.
      vq_loss: scalar, mean over scales of beta * mse(sg(f_hat), f) + mse(f_hat, sg(f)).
      indices: [(B, pn, pn) int32].
    """
    f = self.encode_features(images, train=train)
    f_hat, vq_loss, indices = self.quantizer(f, train=train)
    recon = self.decoder(self.post_quant_conv(f_hat), train=train)
    return recon, vq_loss, indices


def abstract_vqvae(config: Any) -> VQVAE:
  """A VQVAE of ShapeDtypeStructs (no memory, no compute): for shapes, keys and restoring into."""
  validate_config(config)
  return abstract_module(lambda rngs: VQVAE(config, rngs=rngs))


def save_vqvae(directory: str | os.PathLike, model: VQVAE, *, extra_metadata: Mapping | None = None) -> str:
  """Writes parameters + codebook usage and the architecture (as metadata) to a new directory."""
  from hmar_jax import checkpoint

  meta = {"kind": "hmar_jax.vqvae", "config": dict(model.config)}
  meta.update(extra_metadata or {})
  return checkpoint.save_params(directory, model, metadata=meta, variable_filter=CHECKPOINT_VARIABLES)


def load_vqvae(directory: str | os.PathLike, config: Any = None, *, rngs: nnx.Rngs | None = None) -> VQVAE:
  """Loads a checkpoint written by `save_vqvae` or `python -m hmar_jax.convert vqvae`.

  Args:
    directory: the checkpoint folder.
    config: architecture; defaults to the one stored in the checkpoint's metadata. A given
      config must match the stored parameters (a mismatch names the differing keys).
  """
  from hmar_jax import checkpoint

  # Built as shapes and filled from the checkpoint, which holds every variable (CHECKPOINT_VARIABLES).
  model = _abstract_vqvae(directory, config, rngs)
  return checkpoint.restore_params(directory, model, variable_filter=CHECKPOINT_VARIABLES)


def abstract_vqvae_of_checkpoint(directory: str | os.PathLike, config: Any = None) -> VQVAE:
  """The VQVAE `load_vqvae(directory, config)` returns, as shapes only (no weights read), after
  checking the checkpoint's stored keys and shapes against it (its metadata only)."""
  from hmar_jax import checkpoint

  model = _abstract_vqvae(directory, config, None)
  checkpoint.check_params(directory, model, variable_filter=CHECKPOINT_VARIABLES)
  return model


def _abstract_vqvae(directory, config, rngs) -> VQVAE:
  from hmar_jax import checkpoint

  if config is None:
    meta = checkpoint.load_metadata(directory)
    if "config" not in meta:
      raise ValueError(f"{directory} stores no VQVAE config; pass config= (configs/vqvae.py)")
    config = meta["config"]
  return abstract_module(lambda default: VQVAE(config, rngs=rngs or default))
