"""The quick-start job: every stage of HMAR on the built-in data, on CPU, in about ten minutes.

  python -m hmar_jax.main [--workdir=runs/quickstart] [--config=configs/quickstart.py]

1. trains the multi-scale VQ tokenizer  -> WORKDIR/tokenizer/reconstructions.png
2. trains HMAR next-scale prediction    -> WORKDIR/nsp/params
3. masked-prediction finetuning         -> WORKDIR/mask/params
4. samples every class                  -> WORKDIR/samples.png (one row per class)
Each stage resumes from its checkpoints, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import os
import time

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.sample import load_transformer, write_sample_grid
from hmar_jax.tokenizer.vqvae import load_vqvae
from hmar_jax.training.trainer import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Quick-start config.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("runs", "quickstart"), "Output folder.")


def run_quickstart(config, workdir: str) -> dict:
  """Runs the four stages; returns the paths of what each wrote."""
  os.makedirs(workdir, exist_ok=True)
  out = {}
  stages = ("tokenizer", "next-scale", "masked finetune", "sampling")

  def banner(i):
    print(f"\n== stage {i + 1}/{len(stages)}: {stages[i]} ==", flush=True)

  t0 = time.time()
  banner(0)
  tok_dir = os.path.join(workdir, "tokenizer")
  tok = train(config.tokenizer, tok_dir)
  out["reconstructions"] = tok["png"]
  tokenizer_ckpt = tok["tokenizer"]

  banner(1)
  nsp_config = config.nsp
  nsp_config.tokenizer.checkpoint = tokenizer_ckpt
  nsp = train(nsp_config, os.path.join(workdir, "nsp"))
  out["nsp_params"] = nsp["params"]

  banner(2)
  mask_config = config.mask
  mask_config.tokenizer.checkpoint = tokenizer_ckpt
  mask_config.init_from = nsp["params"]
  # Finetune on the next-scale stage's images, reusing its token cache.
  mask_config.data = ml_collections.ConfigDict(nsp_config.data.to_dict())
  mask_config.data.tokens_cache = os.path.join(workdir, "nsp", "tokens.npz")
  mask = train(mask_config, os.path.join(workdir, "mask"))
  out["mask_params"] = mask["params"]

  banner(3)
  s = config.sample
  out["samples"] = write_sample_grid(
    load_transformer(mask["params"]),
    load_vqvae(tokenizer_ckpt),
    os.path.join(workdir, "samples.png"),
    per_class=s.per_class,
    cfg=s.cfg,
    top_k=s.top_k,
    top_p=s.top_p,
    mask_schedule=s.mask_schedule,
    seed=s.seed,
  )
  print(f"\ndone in {(time.time() - t0) / 60:.1f} min:")
  for name, path in out.items():
    print(f"  {name}: {path}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_quickstart(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
