"""MAR's tokenizer: the KL-16 VAE (LDM's AutoencoderKL, LTH14/mar models/vae.py), NHWC, in Flax NNX.

  images (B, H, W, 3) in [-1, 1]
    -> encoder -> quant_conv (1x1)   -> moments (B, H/16, W/16, 2 * embed_dim) = [mean | logvar]
    -> mean + exp(logvar / 2) * eps  -> latents z (B, H/16, W/16, embed_dim)  (logvar clamped to [-30, 20])
    -> post_quant_conv (1x1) -> decoder -> images (B, H, W, 3), unclamped (as the official decode)

MAR trains on latents scaled by `latent_scale` (0.2325 for kl16: engine_mar.py samples
`posterior.sample() * 0.2325` and decodes `vae.decode(tokens / 0.2325)`): `encode_latents` and
`decode_latents` apply it.

The module tree mirrors the official state_dict (encoder.down[i].block[j].conv1, encoder.down[i].attn[j].q,
decoder.mid.attn_1.proj_out, ...), so hmar_jax/convert/kl_vae.py is a rename plus conv-kernel transposes.
Building blocks shared with the VQVAE (hmar_jax/tokenizer/blocks.py) are used where they are the same
computation as LDM's: ResnetBlock (GroupNorm(32, eps 1e-6)-swish-conv3x3 twice, 1x1 nin_shortcut when the
width changes; LDM's temb projection does not exist with temb_channels = 0), Downsample2x (zero-pad right
and bottom by 1, then a stride-2 3x3 conv with no padding), Upsample2x (nearest x2, conv3x3) and Level.
What differs from the VQ blocks, and is defined here:
  * attention: LDM's AttnBlock has separate 1x1 q, k, v convs (the VQ AttnBlock one fused qkv conv);
  * where attention goes: LDM places it by *nominal* resolution, `resolution // 2**level` in
    `attn_resolutions` (encoder (16,), decoder () for kl16, with resolution fixed at 256 whatever the image
    size), where the VQ encoder/decoder put it at the lowest level of both;
  * the encoder's conv_out emits 2 * embed_dim channels (mean and log-variance), and quant_conv /
    post_quant_conv are 1x1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.tokenizer.blocks import Downsample2x, Level, ResnetBlock, Upsample2x, conv, group_norm

CHECKPOINT_KIND = "hmar_jax.kl_vae"
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # official DiagonalGaussianDistribution clamp
MAR_LATENT_SCALE = 0.2325  # engine_mar.py: x = posterior.sample().mul_(0.2325)

# Config fields the architecture needs (kl_vae_config).
ARCH_FIELDS = (
  "in_channels",
  "ch",
  "ch_mult",
  "num_res_blocks",
  "embed_dim",
  "resolution",
  "enc_attn_resolutions",
  "dec_attn_resolutions",
  "dropout",
  "norm_groups",
  "norm_eps",
  "image_size",
  "latent_scale",
)


def kl_vae_config(variant: str = "kl16") -> ml_collections.ConfigDict:
  """The KL VAE architecture.

  'kl16': MAR's kl16.ckpt (main_mar.py: AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)) with the
          Encoder / Decoder defaults ch 128, 2 res blocks, resolution 256, encoder attention at 16,
          none in the decoder's levels, attention in both middles); 256 px -> 16 x 16 x 16 latents.
  'tiny': a small model for tests and CPU runs: ch 32, ch_mult (1, 2, 2), 1 res block, 32 px -> 8 x 8 x 16
          latents, encoder attention at the lowest level (8) and in both middles.
  """
  variant = (variant or "kl16").strip()
  c = ml_collections.ConfigDict()
  c.in_channels = 3
  c.ch = 128
  c.ch_mult = (1, 1, 2, 2, 4)
  c.num_res_blocks = 2  # encoder; the decoder has num_res_blocks + 1 per level
  c.embed_dim = 16  # latent channels (z_channels = embed_dim in AutoencoderKL)
  c.resolution = 256  # nominal: level i has resolution // 2**i, which places attention
  c.enc_attn_resolutions = (16,)
  c.dec_attn_resolutions = ()
  c.dropout = 0.0
  c.norm_groups = 32  # GroupNorm(32, eps=1e-6)
  c.norm_eps = 1e-6
  c.image_size = 256  # training / evaluation image side (the model itself takes any multiple of 16)
  c.latent_scale = MAR_LATENT_SCALE
  if variant == "kl16":
    return c
  if variant == "tiny":
    c.ch = 32
    c.ch_mult = (1, 2, 2)
    c.num_res_blocks = 1
    c.resolution = 32
    c.enc_attn_resolutions = (8,)
    c.image_size = 32
    c.latent_scale = 1.0  # a newly trained VAE: set to ~1 / std of its latents before using it with MAR
    return c
  raise ValueError(f"unknown kl_vae config variant {variant!r}; expected 'kl16' or 'tiny'")


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
      raise ValueError(f"KL VAE config lacks field {name!r} (see hmar_jax/tokenizer/kl_vae.py kl_vae_config)") from None
    out[name] = [int(x) for x in v] if isinstance(v, (tuple, list)) else v
  return out


def validate_config(config: Any) -> dict:
  """Checks a KL VAE config; returns its arch dict. Raises ValueError naming the problem."""
  c = arch_dict(config)
  ch_mult = c["ch_mult"]
  if not ch_mult or any(m <= 0 for m in ch_mult):
    raise ValueError(f"ch_mult must be positive ints, got {ch_mult}")
  for name in ("ch", "num_res_blocks", "embed_dim", "in_channels", "resolution", "image_size", "norm_groups"):
    if isinstance(c[name], bool) or not isinstance(c[name], int) or c[name] < 1:
      raise ValueError(f"{name} must be a positive int, got {c[name]!r}")
  down = 2 ** (len(ch_mult) - 1)
  for name in ("resolution", "image_size"):
    if c[name] % down:
      raise ValueError(
        f"{name} {c[name]} is not divisible by the downsampling factor {down} (len(ch_mult) - 1 halvings)"
      )
  levels = [c["resolution"] // 2**i for i in range(len(ch_mult))]
  for name in ("enc_attn_resolutions", "dec_attn_resolutions"):
    stray = [r for r in c[name] if r not in levels]
    if stray:
      raise ValueError(f"{name} {c[name]}: {stray} match no level (nominal level resolutions {levels})")
  for m in sorted(set([1] + ch_mult)):
    if (c["ch"] * m) % c["norm_groups"]:
      raise ValueError(f"width ch * {m} = {c['ch'] * m} is not divisible by norm_groups {c['norm_groups']}")
  if not c["latent_scale"] > 0:
    raise ValueError(f"latent_scale must be > 0, got {c['latent_scale']}")
  if not 0.0 <= c["dropout"] < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {c['dropout']}")
  return c


class AttnBlock(nnx.Module):
  """LDM's single-head spatial self-attention: separate 1x1 q, k, v convs, proj_out, residual."""

  def __init__(self, channels: int, *, groups: int, eps: float, rngs: nnx.Rngs):
    self.norm = group_norm(channels, groups, eps, rngs=rngs)
    self.q = conv(channels, channels, 1, rngs=rngs)
    self.k = conv(channels, channels, 1, rngs=rngs)
    self.v = conv(channels, channels, 1, rngs=rngs)
    self.proj_out = conv(channels, channels, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H, W, C)."""
    b, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c**-0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + self.proj_out(out)


class MidBlock(nnx.Module):
  """block_1 -> attn_1 -> block_2 (attention always on, as in LDM)."""

  def __init__(self, channels: int, *, groups: int, eps: float, dropout: float, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, groups=groups, eps=eps, dropout=dropout, rngs=rngs)
    self.attn_1 = AttnBlock(channels, groups=groups, eps=eps, rngs=rngs)
    self.block_2 = ResnetBlock(channels, channels, groups=groups, eps=eps, dropout=dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.block_2(self.attn_1(self.block_1(x, train=train)), train=train)


class Encoder(nnx.Module):
  """Images (B, H, W, in_channels) -> (B, H / 2**(n-1), W / 2**(n-1), 2 * embed_dim) (double_z)."""

  def __init__(self, c: dict, *, rngs: nnx.Rngs):
    kw = dict(groups=c["norm_groups"], eps=c["norm_eps"])
    ch, ch_mult, n = c["ch"], tuple(c["ch_mult"]), len(c["ch_mult"])
    self.conv_in = conv(c["in_channels"], ch, 3, rngs=rngs)
    in_ch_mult = (1,) + ch_mult
    levels, block_in = [], ch
    for i_level in range(n):
      block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
      with_attn = c["resolution"] // 2**i_level in c["enc_attn_resolutions"]
      blocks, attns = [], []
      for _ in range(c["num_res_blocks"]):
        blocks.append(ResnetBlock(block_in, block_out, dropout=c["dropout"], rngs=rngs, **kw))
        block_in = block_out
        if with_attn:
          attns.append(AttnBlock(block_in, rngs=rngs, **kw))
      down = Downsample2x(block_in, rngs=rngs) if i_level != n - 1 else None
      levels.append(Level(blocks, attns, down))
    self.down = nnx.List(levels)
    self.mid = MidBlock(block_in, dropout=c["dropout"], rngs=rngs, **kw)
    self.norm_out = group_norm(block_in, c["norm_groups"], c["norm_eps"], rngs=rngs)
    self.conv_out = conv(block_in, 2 * c["embed_dim"], 3, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h, train=train)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    h = self.mid(h, train=train)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latents (B, h, w, embed_dim) -> images (B, h * 2**(n-1), w * 2**(n-1), in_channels), unclamped."""

  def __init__(self, c: dict, *, rngs: nnx.Rngs):
    kw = dict(groups=c["norm_groups"], eps=c["norm_eps"])
    ch, ch_mult, n = c["ch"], tuple(c["ch_mult"]), len(c["ch_mult"])
    block_in = ch * ch_mult[-1]
    self.conv_in = conv(c["embed_dim"], block_in, 3, rngs=rngs)
    self.mid = MidBlock(block_in, dropout=c["dropout"], rngs=rngs, **kw)
    levels = [None] * n
    for i_level in reversed(range(n)):  # built from the lowest resolution up, stored by level (official order)
      block_out = ch * ch_mult[i_level]
      with_attn = c["resolution"] // 2**i_level in c["dec_attn_resolutions"]
      blocks, attns = [], []
      for _ in range(c["num_res_blocks"] + 1):
        blocks.append(ResnetBlock(block_in, block_out, dropout=c["dropout"], rngs=rngs, **kw))
        block_in = block_out
        if with_attn:
          attns.append(AttnBlock(block_in, rngs=rngs, **kw))
      up = Upsample2x(block_in, rngs=rngs) if i_level != 0 else None
      levels[i_level] = Level(blocks, attns, up)
    self.up = nnx.List(levels)
    self.norm_out = group_norm(block_in, c["norm_groups"], c["norm_eps"], rngs=rngs)
    self.conv_out = conv(block_in, c["in_channels"], 3, rngs=rngs)

  def features(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    """The input of the last layer: swish(norm_out(...)) (B, H, W, ch * ch_mult[0])."""
    h = self.mid(self.conv_in(z), train=train)
    for level in reversed(self.up):
      h = level(h, train=train)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return jax.nn.silu(self.norm_out(h))

  def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    return self.conv_out(self.features(z, train=train))


# ----------------------------------------------------------------------------- the posterior


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """moments (..., 2E) -> (mean (..., E), logvar (..., E) clamped to [-30, 20]) (official chunk on channels)."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_latents(moments: jax.Array, key: jax.Array) -> jax.Array:
  """A posterior sample mean + exp(logvar / 2) * eps, eps ~ N(0, I) from `key`. (B, h, w, 2E) -> (B, h, w, E)."""
  mean, logvar = split_moments(moments)
  eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


def mode(moments: jax.Array) -> jax.Array:
  """The posterior mean (B, h, w, E)."""
  return split_moments(moments)[0]


def kl(moments: jax.Array) -> jax.Array:
  """KL(N(mean, var) || N(0, I)) per example: 0.5 * sum(mean^2 + var - 1 - logvar) over (h, w, E). -> (B,)."""
  mean, logvar = split_moments(moments.astype(jnp.float32))
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- the model


class KLVAE(nnx.Module):
  """Encoder + 1x1 quant convs + decoder with the official AutoencoderKL parameter layout."""

  def __init__(self, config: Any, *, rngs: nnx.Rngs):
    c = validate_config(config)
    self.config = c
    self.image_size = int(c["image_size"])
    self.embed_dim = int(c["embed_dim"])
    self.latent_scale = float(c["latent_scale"])
    self.downsample_factor = 2 ** (len(c["ch_mult"]) - 1)
    self.encoder = Encoder(c, rngs=rngs)
    self.decoder = Decoder(c, rngs=rngs)
    self.quant_conv = conv(2 * c["embed_dim"], 2 * c["embed_dim"], 1, rngs=rngs)
    self.post_quant_conv = conv(c["embed_dim"], c["embed_dim"], 1, rngs=rngs)

  def check_images(self, images: jax.Array) -> None:
    """Raises ValueError unless images is float (B, H, W, in_channels), H and W multiples of the downsampling."""
    shape = tuple(getattr(images, "shape", ()))
    cin, f = self.config["in_channels"], self.downsample_factor
    if len(shape) != 4 or shape[-1] != cin or shape[1] % f or shape[2] % f:
      hint = " (NCHW? images are NHWC)" if len(shape) == 4 and shape[1] == cin else ""
      raise ValueError(f"KL VAE expects images of shape (B, H, W, {cin}) with H, W multiples of {f}; got {shape}{hint}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")

  def encode(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """images (B, H, W, 3) in [-1, 1] -> moments (B, H/f, W/f, 2 * embed_dim) (mean | unclamped logvar)."""
    self.check_images(images)
    return self.quant_conv(self.encoder(images, train=train))

  def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    """Latents (B, h, w, embed_dim) -> images (B, h*f, w*f, 3), unclamped (official decode)."""
    if z.ndim != 4 or z.shape[-1] != self.embed_dim:
      raise ValueError(f"KL VAE latents must be (B, h, w, {self.embed_dim}); got {tuple(z.shape)}")
    return self.decoder(self.post_quant_conv(z), train=train)

  sample_latents = staticmethod(sample_latents)
  mode = staticmethod(mode)
  kl = staticmethod(kl)

  def reconstruct(self, images: jax.Array) -> jax.Array:
    """images -> posterior mean -> decode, clamped to [-1, 1] (deterministic)."""
    return jnp.clip(self.decode(mode(self.encode(images))), -1.0, 1.0)

  def encode_latents(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """MAR's training tokens: a posterior sample times latent_scale. -> (B, h, w, embed_dim)."""
    return sample_latents(self.encode(images), key) * self.latent_scale

  def decode_latents(self, tokens: jax.Array) -> jax.Array:
    """MAR's tokens -> images: decode(tokens / latent_scale), unclamped."""
    return self.decode(tokens / self.latent_scale)

  def __call__(self, images: jax.Array, key: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Training forward: (decoded posterior sample (B, H, W, 3) unclamped, moments (B, h, w, 2E))."""
    moments = self.encode(images, train=train)
    return self.decode(sample_latents(moments, key), train=train), moments


def abstract_kl_vae(config: Any) -> KLVAE:
  """A KLVAE of ShapeDtypeStructs (no memory, no compute): for shapes, keys and restoring into."""
  validate_config(config)
  return abstract_module(lambda rngs: KLVAE(config, rngs=rngs))


def save_kl_vae(directory: str | os.PathLike, model: KLVAE, *, extra_metadata: Mapping | None = None) -> str:
  """Writes the parameters and the architecture (as metadata) to a new directory."""
  from hmar_jax import checkpoint

  meta = {"kind": CHECKPOINT_KIND, "config": dict(model.config)}
  meta.update(extra_metadata or {})
  return checkpoint.save_params(directory, model, metadata=meta)


def load_kl_vae(directory: str | os.PathLike, config: Any = None) -> KLVAE:
  """Loads a checkpoint written by `save_kl_vae` or the kl_vae converter, with no random init.

  Args:
    directory: the checkpoint folder.
    config: architecture; defaults to the one stored in the checkpoint's metadata. A given config must
      match the stored parameters (a mismatch names the differing keys).
  """
  from hmar_jax import checkpoint

  meta = checkpoint.load_metadata(directory)
  kind = meta.get("kind")
  if kind is not None and kind != CHECKPOINT_KIND:
    raise ValueError(f"{directory} holds a {kind!r} checkpoint, not a KL VAE ({CHECKPOINT_KIND!r})")
  if config is None:
    if "config" not in meta:
      raise ValueError(f"{directory} stores no KL VAE config; pass config= (kl_vae_config)")
    config = meta["config"]
  model = abstract_kl_vae(config)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)  # host zeros, filled by restore_params
  return checkpoint.restore_params(directory, nnx.merge(graphdef, state))
