"""Training Hi-MAR (task 'himar'): MAR with low-resolution pivots and a diffusion-transformer head.
Defaults: hmar_jax/training/schema.py (MAR's recipe; main_himar.py keeps MAR's training arguments).

  python -m hmar_jax.train --config=configs/himar.py:tiny --workdir=runs/himar_tiny \\
      --config.tokenizer.checkpoint=runs/kl_tokenizer_tiny/tokenizer                          # CPU
  python -m hmar_jax.train --config=configs/himar.py:base --workdir=runs/himar_base \\
      --config.tokenizer.checkpoint=checkpoints/kl16 --config.data.source=tfds --config.data.name=imagenet2012

Variants:
  tiny   32 px over the tiny KL VAE (8 x 8 high-resolution tokens; 4 x 4 pivots from 16 px), 2 + 2 blocks
         of width 64, MLP head 2 x 64 and a 2 x 64 DiT head with few sampling steps, 10 classes
  base, large, huge
         Hi-MAR-B / L / H at 256 px over kl16 (16 x 16 tokens; 8 x 8 pivots from 128 px), the official
         evaluation settings (README: B num_iter 4, cfg 2.5, re_cfg 2.7; L 4, 3.5, 3.5; H 12, 3.2, 5.5)
         and MAR's training recipe (global batch 2048, 400 epochs, lr 1e-4 x batch / 256, 100 warm-up
         epochs, EMA 0.9999).
Writes WORKDIR/params (the EMA weights), samples.png, metrics.jsonl, checkpoints/.
"""

from __future__ import annotations

import ml_collections

from hmar_jax.models.himar import himar_config
from hmar_jax.tokenizer.kl_vae import kl_vae_config
from hmar_jax.training.schema import default_config

VARIANTS = ("tiny", "base", "large", "huge")
IMAGENET_TRAIN_IMAGES = 1_281_167
# Official README evaluation settings per variant: (stage-2 steps, cfg, re_cfg).
SAMPLING = {"base": (4, 2.5, 2.7), "large": (4, 3.5, 3.5), "huge": (12, 3.2, 5.5)}


def tiny_himar() -> ml_collections.ConfigDict:
  m = himar_config("tiny")
  m.img_size = 32
  m.vae_stride = 4  # the tiny KL VAE halves twice: 32 px -> 8 x 8 latents
  m.cond_scale = 4  # pivots: 4 x 4 tokens of the image downsampled to 16 px (official: 8 x 8 of 16 x 16)
  m.buffer_size = 4
  m.class_num = 10
  m.num_sampling_steps = "16"
  return m


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  variant = variant or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
  c = default_config("himar")
  if variant == "tiny":
    c.model = tiny_himar()
    c.tokenizer.config = kl_vae_config("tiny")
    c.data.num_examples = 10_000
    c.data.num_threads = 2
    c.train.batch_size = 32
    c.train.num_steps = 600
    c.train.ema_decay = 0.999
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 30
    c.sample.num_iter = 4
    c.sample.cfg = 2.0
    c.sample.re_cfg = 2.0
    c.log.every_steps = 50
    c.checkpoint.every_steps = 200
  else:
    c.model = himar_config(variant)
    c.tokenizer.config = kl_vae_config("kl16")
    c.train.batch_size = 2048
    c.train.num_steps = 400 * IMAGENET_TRAIN_IMAGES // c.train.batch_size
    c.optim.warmup_steps = 100 * IMAGENET_TRAIN_IMAGES // c.train.batch_size
    c.sample.num_iter, c.sample.cfg, c.sample.re_cfg = SAMPLING[variant]
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.num_examples = 0
    c.log.every_steps = 100
    c.checkpoint.every_steps = 2000
    c.checkpoint.max_to_keep = 3
  return c
