"""Small training configs for the tests: the 16 px tiny tokenizer and a 2-block transformer."""

from __future__ import annotations

import json

import ml_collections

from hmar_jax.models.config import tiny_model_config
from hmar_jax.tokenizer.config import vqvae_config
from hmar_jax.training.schema import default_config


def _quiet(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  c.train.num_steps = steps
  c.optim.warmup_steps = 0
  # The same learning rates whatever num_steps is: runs of different lengths compile the same step
  # (the persistent compilation cache then serves every test after the first).
  c.optim.schedule = "constant"
  c.log.every_steps = 1
  c.log.tensorboard = False
  c.checkpoint.every_steps = steps
  c.data.num_threads = 1
  return c


def nsp_config(kind: str = "hmar", *, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """Next-scale training of tiny_model_config(kind) over a random tiny tokenizer's tokens."""
  c = default_config("nsp")
  c.model = tiny_model_config(kind)
  c.model.attn_implementation = "xla"
  c.tokenizer.config = vqvae_config("tiny")
  c.loss.weighting = "lognorm" if kind == "hmar" else "uniform"
  c.data.num_examples = examples
  c.train.batch_size = batch
  c.optim.lr = 4e-2
  c.sample.grid_at_end = False
  return _quiet(c, steps)


def mask_config(init_from: str, *, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """Masked finetuning of the tiny HMAR from `init_from` (a next-scale run's params)."""
  base = nsp_config("hmar", steps=steps, batch=batch, examples=examples)
  c = default_config("mask_finetune")
  for section in ("model", "tokenizer", "data", "train", "optim", "log", "checkpoint", "sample"):
    c[section] = base[section]
  c.init_from = init_from
  return c


def tokenizer_config(*, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """The tiny 16 px VQVAE with EMA codebook and dead-code restarts (every branch of the step)."""
  c = default_config("tokenizer")
  c.model = vqvae_config("tiny")
  c.data.num_examples = examples
  c.data.num_eval_images = 4
  c.train.batch_size = batch
  c.optim.lr = 2e-3
  c.loss.l2_weight = 1.0
  c.codebook.dead_code_steps = 2
  return _quiet(c, steps)


def read_jsonl(path) -> list[dict]:
  """The rows of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f]
