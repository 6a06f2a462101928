"""Train a tiny multi-scale VQ tokenizer on the built-in procedural shapes at 32 px (CPU, ~3 min).

  python -m hmar_jax.train --config=configs/tokenizer_tiny.py --workdir=runs/tokenizer_tiny

Writes checkpoints (resumed when the workdir has one), metrics.jsonl, the trained tokenizer
(workdir/tokenizer, loadable with hmar_jax.tokenizer.vqvae.load_vqvae) and
workdir/reconstructions.png (rows of originals, each followed by its reconstructions).
Override fields with e.g. --config.train.num_steps=1000 --config.disc.enabled=True.
"""
from __future__ import annotations

import ml_collections

from hmar_jax import config_utils


def _vqvae_configs():
  """configs/vqvae.py."""
  return config_utils.sibling(__file__, "vqvae")


def base_training_config() -> ml_collections.ConfigDict:
  """Every field of a tokenizer training run, with VQGAN-style defaults (shared with tokenizer_vqvae)."""
  c = ml_collections.ConfigDict()
  c.task = "tokenizer"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "procedural"        # 'procedural' (built in) | 'folder' (root/<class>/<images>)
  c.data.path = ""                    # for 'folder'
  c.data.num_examples = 50_000        # procedural: examples per epoch
  c.data.num_classes = 10
  c.data.seed = 0
  c.data.image_size = 256
  c.data.batch_size = 16
  c.data.num_threads = 2
  c.data.num_eval_images = 16         # held out; reconstructed for the PNG and eval_mse

  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0              # taming: |x - x_rec|
  c.loss.l2_weight = 0.0
  c.loss.vq_weight = 1.0              # the VQVAE's vq_loss (beta = 0.25 inside)
  c.loss.perceptual_weight = 0.0      # taming: 1.0 with LPIPS weights
  c.loss.perceptual_weights = ()      # files: VGG16 (torchvision) + LPIPS heads, .pth or .npz

  c.codebook = ml_collections.ConfigDict()
  c.codebook.rule = "gradient"        # 'gradient' (official VAR) | 'ema'
  c.codebook.ema_decay = 0.99
  c.codebook.ema_eps = 1e-5
  c.codebook.dead_code_steps = 0      # > 0: restart codes unused for this many steps

  c.disc = ml_collections.ConfigDict()
  c.disc.enabled = False
  c.disc.start_step = 0               # disc_factor is 0 before this step
  c.disc.factor = 1.0
  c.disc.weight = 0.8                 # taming VQGAN configs: disc_weight 0.8
  c.disc.adaptive_weight = True       # VQGAN's ||grad nll|| / ||grad g|| at the decoder's last layer
  c.disc.base_channels = 64
  c.disc.num_layers = 3
  c.disc.norm = "batch"
  c.disc.lr = 1e-4
  c.disc.b1 = 0.5                     # taming: Adam betas (0.5, 0.9) for both networks
  c.disc.b2 = 0.9
  c.disc.weight_decay = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0          # AdamW decoupled decay on >= 2-D params except the codebook
  c.optim.grad_clip = 0.0             # global-norm clip; 0: off
  c.optim.warmup_steps = 0
  c.optim.decay_steps = 0             # cosine to lr * lr_end_ratio at this step; 0: constant
  c.optim.lr_end_ratio = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100_000
  c.train.log_every = 100
  c.train.ckpt_every = 1000
  c.train.max_to_keep = 3
  return c


def get_config() -> ml_collections.ConfigDict:
  c = base_training_config()
  vqvae = _vqvae_configs()
  # A small VQVAE for 32 px: two stride-2 downsamples (ch_mult of length 3) give 8x8 latents,
  # quantized over 6 scales 1..8 (area ratios 8 -> 3, 8 -> 6 are non-integer, as at 256 px).
  m = vqvae.tiny()
  m.ch = 32
  m.ch_mult = (1, 2, 2)
  m.num_res_blocks = 1
  m.norm_groups = 16
  m.vocab_size = 256
  m.z_channels = 16
  m.patch_nums = (1, 2, 3, 4, 6, 8)
  m.image_size = 32
  c.model = m
  c.data.image_size = m.image_size
  c.data.num_examples = 10_000
  c.data.batch_size = 16
  c.loss.l2_weight = 1.0
  c.optim.lr = 2e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.warmup_steps = 20
  c.optim.decay_steps = 600
  c.optim.lr_end_ratio = 0.1
  c.optim.grad_clip = 1.0
  c.codebook.dead_code_steps = 50
  c.train.num_steps = 600
  c.train.log_every = 50
  c.train.ckpt_every = 200
  return c
