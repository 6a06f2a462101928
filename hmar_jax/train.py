"""Training command line: one entry point for every task, dispatched on `config.task`.

  python -m hmar_jax.train --config=configs/tokenizer.py:tiny --workdir=runs/tok --config.train.num_steps=500
  python -m hmar_jax.train --config=configs/hmar.py:d24 --workdir=runs/d24 --config.mesh.shape='(2,4,1)'

`--config.a.b=v` overrides any config field (ml_collections config_flags; an unknown field is an
error). Tasks: tokenizer, nsp (HMAR or VAR next-scale), mask_finetune (HMAR masked prediction);
see hmar_jax/training/schema.py for every setting. A run resumes from the newest checkpoint in its
workdir. Several processes (one per host or per GPU) run the same command; jax.distributed is
started from the environment (TPU pods, Slurm) or from --config.distributed.* (see launch/).
Exit status: 0 done, 2 bad input, 1 stopped on a non-finite loss, 143 stopped by SIGTERM /
preemption after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.training.trainer import NonFiniteLossError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")

EXIT_NONFINITE = 1
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a scheduler expects of a job it terminated


def run_task(config, workdir: str) -> dict:
  """Runs the training task named by `config.task` in `workdir`; returns its result."""
  return train(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/NAME.py[:variant] is required")
  workdir = _WORKDIR.value or os.path.join("runs", config.get("task", "run"))
  try:
    result = run_task(config, workdir)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_NONFINITE)
  if result.get("preempted"):
    print(
      f"stopped at step {result['step']} (SIGTERM / preemption); checkpoint saved, rerun to resume", file=sys.stderr
    )
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  cli.run(main)
