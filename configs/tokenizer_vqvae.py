"""Train the official-architecture VQVAE (VAR's vae_ch160v4096z32) at 256 px, VQGAN style (GPU/TPU).

  python -m hmar_jax.train --config=configs/tokenizer_vqvae.py --workdir=runs/tokenizer_vqvae \
      --config.data.source=folder --config.data.path=/data/my_images/train \
      --config.loss.perceptual_weight=1.0 \
      --config.loss.perceptual_weights="('/weights/vgg16-397923af.pth', '/weights/lpips_vgg_v0.1.pth')"

The official repositories publish no tokenizer training recipe (VAR released only the trained
vae_ch160v4096z32.pth); these defaults follow VQGAN / taming-transformers (Adam betas (0.5, 0.9),
L1 + LPIPS + hinge PatchGAN with the adaptive weight 0.8, discriminator switched on late) with
VAR's quantizer loss (beta 0.25) and the plain gradient codebook rule. The perceptual loss is off
unless you give LPIPS weight files (nothing is downloaded), see hmar_jax/tokenizer/perceptual.py.
"""
from __future__ import annotations

from hmar_jax import config_utils


def _sibling(name):
  return config_utils.sibling(__file__, name)


def get_config():
  c = _sibling("tokenizer_tiny").base_training_config()
  c.model = _sibling("vqvae").get_config("256")     # ch 160, V 4096, Cvae 32, patch_nums 1..16
  c.data.image_size = c.model.image_size
  c.data.num_examples = 1_000_000                   # procedural source: examples per epoch
  c.data.batch_size = 32
  c.data.num_threads = 16
  c.loss.l1_weight = 1.0
  c.loss.l2_weight = 1.0
  c.loss.perceptual_weight = 0.0                    # 1.0 (taming) once perceptual_weights are given
  c.disc.enabled = True
  c.disc.start_step = 50_000
  c.disc.weight = 0.8
  c.disc.adaptive_weight = True
  c.disc.lr = 1e-4
  c.optim.lr = 1e-4
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.warmup_steps = 1_000
  c.optim.grad_clip = 0.0
  c.codebook.rule = "gradient"
  c.codebook.dead_code_steps = 0
  c.train.num_steps = 400_000
  c.train.log_every = 100
  c.train.ckpt_every = 5_000
  c.data.num_eval_images = 16
  return c
