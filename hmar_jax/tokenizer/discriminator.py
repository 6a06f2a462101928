"""PatchGAN discriminator for VQGAN-style tokenizer training.

A Flax NNX restatement of the NLayerDiscriminator used by taming-transformers (itself
pix2pix's PatchGAN): conv4x4/s2 + LeakyReLU(0.2), then `num_layers - 1` blocks of
conv4x4/s2 (no bias) + norm + LeakyReLU with channels base * min(2**n, 8), one more such
block with stride 1, and a conv4x4/s1 to one logit per patch. All convs pad 1 on every side.
Initialisation as taming's `weights_init`: conv kernels ~ N(0, 0.02), norm scales
~ N(1, 0.02), biases 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_NORMS = ("batch", "group", "none")


class NLayerDiscriminator(nnx.Module):
  """PatchGAN discriminator: images (B, H, W, C) -> patch logits (B, h, w, 1).

  For H = 256 and num_layers = 3 the logits are 30x30 (pix2pix's 70x70 receptive field).

  Args:
    in_channels: image channels (3).
    base_channels: channels of the first conv (taming: 64).
    num_layers: number of stride-2 convs (taming: 3).
    norm: 'batch' (taming default: BatchNorm2d, torch momentum 0.1, eps 1e-5), 'group'
      (GroupNorm with 32 groups or fewer, no batch statistics) or 'none'.
  """

  def __init__(
    self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, *, norm: str = "batch", rngs: nnx.Rngs
  ):
    if norm not in _NORMS:
      raise ValueError(f"discriminator norm must be one of {_NORMS}, got {norm!r}")
    if num_layers < 1:
      raise ValueError(f"discriminator num_layers must be >= 1, got {num_layers}")
    self.norm = norm
    self.num_layers = num_layers
    conv_init = nnx.initializers.normal(0.02)
    pad = ((1, 1), (1, 1))
    self.conv_in = nnx.Conv(
      in_channels, base_channels, (4, 4), strides=2, padding=pad, kernel_init=conv_init, rngs=rngs
    )
    convs, norms = [], []
    channels = base_channels
    for n in range(1, num_layers + 1):
      out_channels = base_channels * min(2**n, 8)
      stride = 2 if n < num_layers else 1
      convs.append(
        nnx.Conv(
          channels,
          out_channels,
          (4, 4),
          strides=stride,
          padding=pad,
          use_bias=(norm == "none"),
          kernel_init=conv_init,
          rngs=rngs,
        )
      )
      norms.append(self._make_norm(out_channels, rngs))
      channels = out_channels
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.conv_out = nnx.Conv(channels, 1, (4, 4), strides=1, padding=pad, kernel_init=conv_init, rngs=rngs)

  def _make_norm(self, channels: int, rngs: nnx.Rngs):
    scale_init = lambda key, shape, dtype=jnp.float32: 1.0 + 0.02 * jax.random.normal(key, shape, dtype)
    if self.norm == "batch":
      # torch BatchNorm2d momentum 0.1 (new-stat weight) == flax momentum 0.9 (old-stat weight).
      return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, scale_init=scale_init, rngs=rngs)
    if self.norm == "group":
      return nnx.GroupNorm(channels, num_groups=min(32, channels), epsilon=1e-5, scale_init=scale_init, rngs=rngs)
    return None

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """images: (B, H, W, C) -> logits (B, h, w, 1) float32. `train` makes BatchNorm use and update batch stats."""
    if images.ndim != 4:
      raise ValueError(f"discriminator expects (B, H, W, C) images, got shape {images.shape}")
    x = jax.nn.leaky_relu(self.conv_in(images), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = conv(x)
      if self.norm == "batch":
        x = norm(x, use_running_average=not train)
      elif norm is not None:
        x = norm(x)
      x = jax.nn.leaky_relu(x, 0.2)
    return self.conv_out(x).astype(jnp.float32)
