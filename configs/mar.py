"""Training MAR (task 'mar'): masked autoregression with a diffusion loss over KL-VAE tokens.
Defaults (the official recipe of LTH14/mar main_mar.py): hmar_jax/training/schema.py.

  python -m hmar_jax.train --config=configs/mar.py:tiny --workdir=runs/mar_tiny \\
      --config.tokenizer.checkpoint=runs/kl_tokenizer_tiny/tokenizer                          # CPU, minutes
  python -m hmar_jax.train --config=configs/mar.py:base --workdir=runs/mar_base \\
      --config.tokenizer.checkpoint=checkpoints/kl16 --config.data.source=tfds --config.data.name=imagenet2012

Variants:
  tiny   32 px over the tiny KL VAE of configs/kl_tokenizer.py:tiny (8 x 8 tokens of 16 channels),
         2 + 2 blocks of width 64, diffusion head 2 x 64, 10 classes; 16 diffusion sampling steps
  base, large, huge
         MAR-B / L / H at 256 px over kl16 (16 x 16 tokens), the official recipe: AdamW (0.9, 0.95),
         lr 1e-4 x global batch / 256 with 100 warm-up epochs from 0 then constant, weight decay 0.02,
         gradient clip 3.0, EMA 0.9999, dropout 0.1, diffusion batch x4, global batch 2048, 400 epochs
         (the released models: 800); the step count assumes ImageNet's 1,281,167 images.
Writes WORKDIR/params (load_mar-able; the EMA weights), samples.png, metrics.jsonl, checkpoints/.
"""

from __future__ import annotations

import ml_collections

from hmar_jax.models.mar import mar_config
from hmar_jax.tokenizer.kl_vae import kl_vae_config
from hmar_jax.training.schema import default_config

VARIANTS = ("tiny", "base", "large", "huge")
IMAGENET_TRAIN_IMAGES = 1_281_167


def tiny_mar() -> ml_collections.ConfigDict:
  m = mar_config("tiny")
  m.img_size = 32
  m.vae_stride = 4  # the tiny KL VAE halves twice: 32 px -> 8 x 8 latents
  m.buffer_size = 4
  m.class_num = 10
  m.num_sampling_steps = "16"
  return m


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  variant = variant or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
  c = default_config("mar")
  if variant == "tiny":
    c.model = tiny_mar()
    c.tokenizer.config = kl_vae_config("tiny")
    c.data.num_examples = 10_000
    c.data.num_threads = 2
    c.train.batch_size = 32
    c.train.num_steps = 600
    c.train.ema_decay = 0.999  # short run: the official 0.9999 would keep the EMA near the initial weights
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 30
    c.sample.num_iter = 8
    c.log.every_steps = 50
    c.checkpoint.every_steps = 200
  else:
    c.model = mar_config(variant)
    c.tokenizer.config = kl_vae_config("kl16")
    c.train.batch_size = 2048
    epochs = 400
    c.train.num_steps = epochs * IMAGENET_TRAIN_IMAGES // c.train.batch_size
    c.optim.warmup_steps = 100 * IMAGENET_TRAIN_IMAGES // c.train.batch_size
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.num_examples = 0
    c.log.every_steps = 100
    c.checkpoint.every_steps = 2000
    c.checkpoint.max_to_keep = 3
  return c
