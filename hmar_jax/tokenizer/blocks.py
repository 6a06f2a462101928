"""Encoder and decoder of the multi-scale VQVAE (VAR models/basic_vae.py), NHWC.

The module tree mirrors the official one attribute by attribute (encoder.down[i].block[j].conv1,
decoder.up[i].attn[j].qkv, ...), so the PyTorch state_dict maps onto it by renaming
weight -> kernel/scale/embedding and transposing conv kernels (hmar_jax/convert/vqvae.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# torch nn.Conv2d's default weight init (kaiming_uniform with a = sqrt(5)) is
# uniform(+-1/sqrt(fan_in)), i.e. variance_scaling(1/3, fan_in, uniform).
_torch_like_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(in_ch: int, out_ch: int, kernel_size: int, *, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
  """nnx.Conv with PyTorch's symmetric `kernel_size // 2` padding unless `padding` is given."""
  if padding is None:
    p = kernel_size // 2
    padding = ((p, p), (p, p))
  return nnx.Conv(
    in_ch,
    out_ch,
    (kernel_size, kernel_size),
    strides=stride,
    padding=padding,
    kernel_init=_torch_like_kernel_init,
    rngs=rngs,
  )


def group_norm(channels: int, groups: int, eps: float, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  if channels % groups:
    raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
  # Two-pass variance like torch (the one-pass E[x^2] - E[x]^2 loses digits at large means).
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=rngs)


class ResnetBlock(nnx.Module):
  """norm-swish-conv3x3 twice, plus a 1x1 conv shortcut when the width changes."""

  def __init__(self, in_ch: int, out_ch: int, *, groups: int, eps: float, dropout: float, rngs: nnx.Rngs):
    self.norm1 = group_norm(in_ch, groups, eps, rngs=rngs)
    self.conv1 = conv(in_ch, out_ch, 3, rngs=rngs)
    self.norm2 = group_norm(out_ch, groups, eps, rngs=rngs)
    # Official: nn.Dropout only when dropout > 1e-6, else Identity.
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 1e-6 else None
    self.conv2 = conv(out_ch, out_ch, 3, rngs=rngs)
    self.nin_shortcut = conv(in_ch, out_ch, 1, rngs=rngs) if in_ch != out_ch else None

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, H, W, in_ch) -> (B, H, W, out_ch)."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = jax.nn.silu(self.norm2(h))
    if self.dropout is not None:
      h = self.dropout(h, deterministic=not train)
    h = self.conv2(h)
    shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
    return shortcut + h


class AttnBlock(nnx.Module):
  """Single-head spatial self-attention with a fused 1x1 qkv conv, residual."""

  def __init__(self, channels: int, *, groups: int, eps: float, rngs: nnx.Rngs):
    self.channels = channels
    self.norm = group_norm(channels, groups, eps, rngs=rngs)
    # Official: one conv to 3C channels, split as (3, C) on the channel axis.
    self.qkv = conv(channels, 3 * channels, 1, rngs=rngs)
    self.proj_out = conv(channels, channels, 1, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: (B, H, W, C) -> (B, H, W, C)."""
    b, h, w, c = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, c)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c**-0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + self.proj_out(out)


class Downsample2x(nnx.Module):
  """Official asymmetric downsampling: zero-pad right and bottom by 1, 3x3 conv stride 2."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    # F.pad(x, (0, 1, 0, 1)) then Conv2d(k=3, s=2, p=0).
    self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2x(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # torch nearest with scale_factor=2 takes source floor(i / 2): a plain repeat.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Level(nnx.Module):
  """One resolution of the encoder (`down[i]`) or decoder (`up[i]`)."""

  def __init__(self, blocks: list, attns: list, resample):
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    if resample is not None:
      # Attribute name follows the official key (down[i].downsample / up[i].upsample).
      setattr(self, "downsample" if isinstance(resample, Downsample2x) else "upsample", resample)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for i, block in enumerate(self.block):
      x = block(x, train=train)
      if len(self.attn):
        x = self.attn[i](x)
    return x


class MidBlock(nnx.Module):
  def __init__(self, channels: int, *, using_attn: bool, groups: int, eps: float, dropout: float, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, groups=groups, eps=eps, dropout=dropout, rngs=rngs)
    self.attn_1 = AttnBlock(channels, groups=groups, eps=eps, rngs=rngs) if using_attn else None
    self.block_2 = ResnetBlock(channels, channels, groups=groups, eps=eps, dropout=dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.block_1(x, train=train)
    if self.attn_1 is not None:
      x = self.attn_1(x)
    return self.block_2(x, train=train)


class Encoder(nnx.Module):
  """Images (B, H, W, in_channels) -> features (B, H / 2**(n-1), W / 2**(n-1), z_channels)."""

  def __init__(
    self,
    *,
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    z_channels: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    using_sa: bool = True,
    using_mid_sa: bool = True,
    norm_groups: int = 32,
    norm_eps: float = 1e-6,
    rngs: nnx.Rngs,
  ):
    kw = dict(groups=norm_groups, eps=norm_eps)
    n = len(ch_mult)
    self.conv_in = conv(in_channels, ch, 3, rngs=rngs)
    in_ch_mult = (1,) + tuple(ch_mult)
    levels = []
    block_in = ch
    for i_level in range(n):
      block_in = ch * in_ch_mult[i_level]
      block_out = ch * ch_mult[i_level]
      blocks, attns = [], []
      for _ in range(num_res_blocks):
        blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, rngs=rngs, **kw))
        block_in = block_out
        # Official: attention after every block of the lowest-resolution level.
        if i_level == n - 1 and using_sa:
          attns.append(AttnBlock(block_in, rngs=rngs, **kw))
      down = Downsample2x(block_in, rngs=rngs) if i_level != n - 1 else None
      levels.append(Level(blocks, attns, down))
    self.down = nnx.List(levels)
    self.mid = MidBlock(block_in, using_attn=using_mid_sa, dropout=dropout, rngs=rngs, **kw)
    self.norm_out = group_norm(block_in, norm_groups, norm_eps, rngs=rngs)
    self.conv_out = conv(block_in, z_channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h, train=train)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    h = self.mid(h, train=train)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latents (B, h, w, z_channels) -> images (B, h * 2**(n-1), w * 2**(n-1), in_channels), unclamped."""

  def __init__(
    self,
    *,
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    z_channels: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    using_sa: bool = True,
    using_mid_sa: bool = True,
    norm_groups: int = 32,
    norm_eps: float = 1e-6,
    rngs: nnx.Rngs,
  ):
    kw = dict(groups=norm_groups, eps=norm_eps)
    n = len(ch_mult)
    block_in = ch * ch_mult[-1]
    self.conv_in = conv(z_channels, block_in, 3, rngs=rngs)
    self.mid = MidBlock(block_in, using_attn=using_mid_sa, dropout=dropout, rngs=rngs, **kw)
    levels = [None] * n
    for i_level in reversed(range(n)):  # built from the lowest resolution up, stored by level
      block_out = ch * ch_mult[i_level]
      blocks, attns = [], []
      # Official: the decoder has num_res_blocks + 1 blocks per level.
      for _ in range(num_res_blocks + 1):
        blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, rngs=rngs, **kw))
        block_in = block_out
        if i_level == n - 1 and using_sa:
          attns.append(AttnBlock(block_in, rngs=rngs, **kw))
      up = Upsample2x(block_in, rngs=rngs) if i_level != 0 else None
      levels[i_level] = Level(blocks, attns, up)
    self.up = nnx.List(levels)
    self.norm_out = group_norm(block_in, norm_groups, norm_eps, rngs=rngs)
    self.conv_out = conv(block_in, in_channels, 3, rngs=rngs)

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
