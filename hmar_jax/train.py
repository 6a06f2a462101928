"""Training command line: one entry point, dispatched on `config.task`.

  python -m hmar_jax.train --config=configs/tokenizer_tiny.py --workdir=runs/tok \
      --config.train.num_steps=500

`--config.a.b=v` overrides any config field (ml_collections config_flags). Tasks:
  tokenizer      multi-scale VQ tokenizer (hmar_jax.training.tokenizer)
  nsp            next-scale prediction, HMAR or VAR (hmar_jax.training.nsp)
  mask_finetune  HMAR masked-prediction finetuning (hmar_jax.training.mask_finetune)
A run resumes from the newest checkpoint in its workdir.
"""
from __future__ import annotations

import importlib
import os

from absl import app, flags
from ml_collections import config_flags

from hmar_jax import cli

# task -> (module, function); imported lazily so one task's dependencies never load for another.
TASKS = {
    "tokenizer": ("hmar_jax.training.tokenizer", "train_tokenizer"),
    "nsp": ("hmar_jax.training.nsp", "train_nsp"),
    "mask_finetune": ("hmar_jax.training.mask_finetune", "train_mask_finetune"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and sample PNGs go.")


def run_task(config, workdir: str):
  """Runs the training task named by `config.task` in `workdir`; returns its result."""
  task = config.get("task")
  if task not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {task!r}")
  module_name, fn_name = TASKS[task]
  fn = getattr(importlib.import_module(module_name), fn_name)
  os.makedirs(workdir, exist_ok=True)
  return fn(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  workdir = _WORKDIR.value or os.path.join("runs", config.get("task", "run"))
  run_task(config, workdir)


if __name__ == "__main__":
  cli.run(main)
