"""Training the multi-scale VQ tokenizer (task 'tokenizer'). Defaults: hmar_jax/training/schema.py.

  python -m hmar_jax.train --config=configs/tokenizer.py:tiny --workdir=runs/tokenizer_tiny      # CPU, minutes
  python -m hmar_jax.train --config=configs/tokenizer.py:vqvae --workdir=runs/vqvae \\
      --config.data.source=folder --config.data.path=/data/train                              # official architecture

Variants:
  tiny   a small VQVAE for 32 px images: two stride-2 downsamples (8 x 8 latents) quantized over
         6 scales 1..8 (area ratios 8 -> 3, 8 -> 6 are non-integer, as at 256 px), V 256, Cvae 16
  vqvae  the official vae_ch160v4096z32 architecture at 256 px, VQGAN-style losses
Writes WORKDIR/tokenizer (load_vqvae-able), reconstructions.png, metrics.jsonl, checkpoints/.
"""

from __future__ import annotations

import ml_collections

from hmar_jax.tokenizer.config import vqvae_config
from hmar_jax.training.schema import default_config


def tiny_vqvae() -> ml_collections.ConfigDict:
  m = vqvae_config("tiny")
  m.ch = 32
  m.ch_mult = (1, 2, 2)
  m.num_res_blocks = 1
  m.norm_groups = 16
  m.vocab_size = 256
  m.z_channels = 16
  m.patch_nums = (1, 2, 3, 4, 6, 8)
  m.image_size = 32
  return m


VARIANTS = ("tiny", "vqvae")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  variant = variant or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
  c = default_config("tokenizer")
  if variant == "tiny":
    c.model = tiny_vqvae()
    c.data.num_examples = 10_000
    c.train.batch_size = 16
    c.train.num_steps = 600
    c.loss.l2_weight = 1.0
    c.optim.lr = 2e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.schedule = "cos"  # warmup from 0, half cosine to 0.1 x lr at the last step
    c.optim.warmup_steps = 20
    c.optim.wp0 = 0.0
    c.optim.wpe = 0.1
    c.optim.grad_clip = 1.0
    c.codebook.dead_code_steps = 50
    c.data.num_threads = 2
    c.log.every_steps = 50
    c.checkpoint.every_steps = 200
  else:
    c.model = vqvae_config("256")
    c.train.num_steps = 100_000
    c.log.every_steps = 100
    c.checkpoint.every_steps = 1000
    c.checkpoint.max_to_keep = 3
  return c
