"""Training MAR's KL VAE tokenizer (task 'kl_tokenizer'). Defaults: hmar_jax/training/schema.py.

  python -m hmar_jax.train --config=configs/kl_tokenizer.py:tiny --workdir=runs/kl_tokenizer_tiny   # CPU, minutes
  python -m hmar_jax.train --config=configs/kl_tokenizer.py:kl16 --workdir=runs/kl16 \\
      --config.data.source=folder --config.data.path=/data/train                               # official architecture

Variants:
  tiny   a small KL VAE for 32 px images: ch 32, ch_mult (1, 2, 2), 1 res block, 8 x 8 x 16 latents,
         L1 + L2 reconstruction and LDM's kl_weight
  kl16   MAR's kl16 architecture at 256 px (16 x 16 x 16 latents), LDM-style losses: L1, kl_weight 1e-6
         (add LPIPS with --config.loss.perceptual_weight=1.0 --config.loss.perceptual_weights=...,
         and the PatchGAN with --config.disc.enabled=True --config.disc.start_step=50001 --config.disc.weight=0.5)
Writes WORKDIR/tokenizer (load_kl_vae-able), reconstructions.png, result.json, metrics.jsonl, checkpoints/.
"""

from __future__ import annotations

import ml_collections

from hmar_jax.tokenizer.kl_vae import kl_vae_config
from hmar_jax.training.schema import default_config

VARIANTS = ("tiny", "kl16")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  variant = variant or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
  c = default_config("kl_tokenizer")
  if variant == "tiny":
    c.model = kl_vae_config("tiny")
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
    c.data.num_threads = 2
    c.log.every_steps = 50
    c.checkpoint.every_steps = 200
    c.normalize_latents = True  # MAR / Hi-MAR train on its latents with unit spread
  else:
    c.model = kl_vae_config("kl16")
    c.train.num_steps = 100_000
    c.log.every_steps = 100
    c.checkpoint.every_steps = 1000
    c.checkpoint.max_to_keep = 3
  return c
