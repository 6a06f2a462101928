"""Builds the latent cache of a MAR / Hi-MAR training config ahead of training (official main_cache.py).

  python -m hmar_jax.cache_latents --config=configs/mar.py:base --workdir=runs/mar_base \\
      --config.tokenizer.checkpoint=checkpoints/kl16 --config.data.latents_cache=auto

Takes the training command's config, overrides and workdir, and encodes into the directory that
training with them reads (config.data.latents_cache: 'auto' = WORKDIR/latents, or a directory), then
exits; training with the same settings then starts at once. Resumable (rerun the same command), and
several processes (one per host) share the work as in training (jax.distributed from
config.distributed). See hmar_jax/training/latent_cache.py for what is stored. Exit status 2 on bad
input (a config of another task, latents_cache '', a directory holding another cache).
"""

from __future__ import annotations

import os

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.parallel import initialize_distributed, is_primary
from hmar_jax.training import schema


def define_flags() -> None:
  """Defines this command line's flags. Called only when the module runs as a program, so that
  importing it (for build) defines no --config next to another command line's."""
  config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's workdir (where 'auto' puts the cache).")


def build(config: ml_collections.ConfigDict, workdir: str):
  """Validates `config` (task mar or himar, latents_cache on), then builds or completes its latent
  cache; returns the LatentCacheSource. Collective with several processes."""
  if config.get("task") not in ("mar", "himar"):
    raise ValueError(f"the latent cache is for tasks mar and himar; this config's task is {config.get('task')!r}")
  schema.validate(config)
  if not config.data.latents_cache:
    raise ValueError(
      "config.data.latents_cache is '' (encode every step): set it to 'auto' (WORKDIR/latents) or a directory, "
      "and give training the same setting"
    )
  from hmar_jax.training.tasks import TASKS  # noqa: PLC0415 - the models load only once the config is good

  return TASKS[config.task](config, os.path.abspath(workdir)).latents()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config=configs/NAME.py[:variant] is required (the training config)")
  workdir = flags.FLAGS.workdir or os.path.join("runs", config.get("task", "run"))
  schema.validate(config)  # before jax.distributed starts
  initialize_distributed(config.distributed)
  cache = build(config, workdir)
  if is_primary():
    print(
      f"latent cache {cache.directory}: {len(cache)} images ({cache.unreadable} unreadable left out), "
      f"views {', '.join(cache.views)}"
    )


if __name__ == "__main__":
  define_flags()
  cli.run(main)
