"""Multi-scale VQVAE (VAR's tokenizer) architecture defaults, in one place.

`vqvae_config()` is the official `vae_ch160v4096z32.pth` architecture at 256 px
(VAR models/vqvae.py + models/__init__.py build_vae_var: ch=160, V=4096, Cvae=32,
share_quant_resi=4, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, beta=0.25,
quant_resi=0.5, quant_conv_ks=3, no z-norm). Variants:

  vqvae_config()          official, 256 px, patch_nums 1..16 (10 scales, L = 680)
  vqvae_config('512')     official weights, 512 px patch_nums (10 scales, L = 2240)
  vqvae_config('1024')    official weights, 1024 px patch_nums (14 scales)
  vqvae_config('tiny')    a small model for tests and CPU smoke runs (16 px images)

configs/vqvae.py exposes the same variants to config files (`--config=configs/vqvae.py:tiny`).
"""

from __future__ import annotations

import ml_collections

PATCH_NUMS = {
  # HMAR/VAR paper layouts (VAR / HMAR models/__init__.py).
  "256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
  "1024": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


def official(patch_nums=PATCH_NUMS["256"]) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Encoder / decoder (VAR basic_vae.py, ddconfig in vqvae.py).
  c.in_channels = 3
  c.ch = 160
  c.ch_mult = (1, 1, 2, 2, 4)
  c.num_res_blocks = 2  # encoder; the decoder uses num_res_blocks + 1
  c.dropout = 0.0
  c.using_sa = True  # single-head self-attention at the lowest resolution
  c.using_mid_sa = True  # ... and in the middle block
  c.norm_groups = 32  # GroupNorm(32, eps=1e-6)
  c.norm_eps = 1e-6
  # Quantizer (VAR quant.py VectorQuantizer2).
  c.vocab_size = 4096
  c.z_channels = 32  # Cvae
  c.beta = 0.25  # commitment weight
  c.using_znorm = False  # cosine-similarity lookup instead of L2 when True
  c.quant_conv_ks = 3
  c.quant_resi = 0.5  # phi(h) = (1 - r) * h + r * conv3x3(h)
  c.share_quant_resi = 4  # 0: one phi per scale, 1: one shared phi, k: k phis, chosen by tick
  c.default_qresi_counts = 0  # phis when share_quant_resi == 0 (0: one per scale)
  c.patch_nums = tuple(patch_nums)
  # Derived and checked: image side = patch_nums[-1] * 2 ** (len(ch_mult) - 1).
  c.image_size = patch_nums[-1] * 2 ** (len(c.ch_mult) - 1)
  # Codebook init for training from scratch: <0 uniform(+-|x|/V) (taming), >0 trunc-normal std x.
  c.codebook_init = -1.0
  return c


def tiny() -> ml_collections.ConfigDict:
  """A few-thousand-parameter model with every official block kind in it.

  One downsample/upsample, a channel change (nin_shortcut), attention at the lowest
  resolution and in the middle, 4 partially shared phis over 5 scales with a
  non-integer area ratio (8 -> 5, 8 -> 3).
  """
  c = official(patch_nums=(1, 2, 3, 5, 8))
  c.ch = 32
  c.ch_mult = (1, 2)
  c.num_res_blocks = 1
  c.vocab_size = 64
  c.z_channels = 8
  c.image_size = 8 * 2
  return c


def vqvae_config(variant: str = "256") -> ml_collections.ConfigDict:
  variant = (variant or "256").strip()
  if variant in ("", "official", "256"):
    return official()
  if variant in PATCH_NUMS:
    return official(PATCH_NUMS[variant])
  if variant == "tiny":
    return tiny()
  raise ValueError(
    f"unknown vqvae config variant {variant!r}; expected one of {sorted(PATCH_NUMS) + ['official', 'tiny']}"
  )
