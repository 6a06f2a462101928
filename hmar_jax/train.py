"""Training command line: one entry point for every task, dispatched on `config.task`.

  python -m hmar_jax.train --config=configs/tokenizer.py:tiny --workdir=runs/tok --config.train.num_steps=500
  python -m hmar_jax.train --config=configs/hmar.py:d24 --workdir=runs/d24 --config.mesh.shape='(2,4,1)'

`--config.a.b=v` overrides any config field (ml_collections config_flags; an unknown field is an
error). Tasks: tokenizer, nsp (HMAR or VAR next-scale), mask_finetune (HMAR masked prediction);
see hmar_jax/training/schema.py for every setting. A run resumes from the newest checkpoint in its
workdir. Several processes (one per host or per GPU) run the same command; jax.distributed is
started from the environment (TPU pods, Slurm) or from --config.distributed.* (see launch/).
Exit status: 0 done, 2 bad input, 1 stopped on a non-finite loss, 130 stopped by Ctrl-C (SIGINT)
and 143 by SIGTERM / preemption, both after saving a checkpoint at the step reached (rerun the same
command to resume; a second Ctrl-C aborts at once, keeping the checkpoints saved before).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.cli import EXIT_INTERRUPTED, EXIT_NONFINITE, stop_report
from hmar_jax.training.trainer import NonFiniteLossError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")


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
  except KeyboardInterrupt:  # Ctrl-C twice, or before training began: nothing more was saved
    print(
      f"interrupted: stopped without saving; rerun the same command to resume from the newest checkpoint "
      f"(if any) in {os.path.join(workdir, 'checkpoints')}",
      file=sys.stderr,
    )
    sys.exit(EXIT_INTERRUPTED)
  stopped = stop_report(result)
  if stopped is not None:
    code, line = stopped
    print(line, file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
  cli.run(main)
