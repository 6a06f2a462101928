"""The README's main job: tokenizer -> HMAR next-scale -> masked finetuning -> samples, on CPU.

  python -m hmar_jax.main                       # this config, workdir runs/quickstart
  python -m hmar_jax.main --config.nsp.train.num_steps=1000

Each stage is a complete config of its own task (the same ones `python -m hmar_jax.train`
takes); this file only ties them together so that the transformer is built for the tokenizer
that was just trained (same patch_nums, codebook size and latent width).
"""
import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"hmar_jax_configs_{name}", os.path.join(_HERE, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  from hmar_jax.models.config import model_config

  tokenizer = _load("tokenizer_tiny").get_config()
  tok = tokenizer.model

  nsp = _load("train_hmar_tiny").get_config()
  # A small HMAR over the tokenizer's own scales (32 px images, 1..8 token maps).
  nsp.model = model_config(4, kind="hmar", patch_nums=tok.patch_nums, width=128, num_heads=4,
                           vocab_size=tok.vocab_size, cvae=tok.z_channels,
                           num_classes=tokenizer.data.num_classes, mask_layers=2)
  nsp.tokenizer.config = tok
  nsp.data.num_examples = 4000
  nsp.data.num_classes = tokenizer.data.num_classes
  nsp.train.num_steps = 800

  mask = _load("train_hmar_tiny_mask").get_config()
  mask.model = nsp.model
  mask.tokenizer.config = tok
  mask.data = nsp.data
  mask.train.num_steps = 300

  c = ml_collections.ConfigDict()
  c.tokenizer = tokenizer
  c.nsp = nsp
  c.mask = mask
  c.sample = ml_collections.ConfigDict()
  c.sample.per_class = 8
  c.sample.cfg = 2.0
  c.sample.top_k = 0
  c.sample.top_p = 0.0
  # Official-style schedule for 1,2,3,4,6,8: refine the 2x2 .. 4x4 maps in several steps.
  c.sample.mask_schedule = [[1], [1, 3], [1, 2, 6], [4, 6, 6], [36], [64]]
  c.sample.seed = 0
  return c
