"""Sample class-conditional images from a trained HMAR / VAR and write a PNG grid.

  python -m hmar_jax.sample --params=runs/hmar_mask/params --tokenizer=runs/tokenizer/params \
      --classes=0,1,2,3 --per_class=8 --cfg=1.5 --top_k=0 --top_p=0 \
      --mask_schedule='[[1],[1,3],[1,2,6],[25],[64]]' --seed=0 --out=samples.png

--params is a directory written by training (workdir/params: weights plus the model config
in its metadata); --tokenizer a VQVAE checkpoint (save_vqvae). --mask_schedule 'none'
samples with next-scale prediction only; 'default' is the official 256 px schedule.
Each row of the grid is one class.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from hmar_jax import checkpoint, cli
from hmar_jax.image_grid import save_image_grid
from hmar_jax.models.config import upgrade_model_config
from hmar_jax.models.transformer import ScaleTransformer
from hmar_jax.sampling import DEFAULT_MASK_SCHEDULE_256, Sampler, validate_mask_schedule
from hmar_jax.tokenizer.vqvae import load_vqvae

_PARAMS = flags.DEFINE_string("params", None, "Trained transformer checkpoint directory (workdir/params).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "VQVAE checkpoint directory.")
_CLASSES = flags.DEFINE_string("classes", "", "Comma-separated class ids (default: all classes, up to 10).")
_PER_CLASS = flags.DEFINE_integer("per_class", 8, "Samples per class (one grid row per class).")
_CFG = flags.DEFINE_float("cfg", 1.5, "Classifier-free guidance at the last scale (linear ramp from 0).")
_TOP_K = flags.DEFINE_integer("top_k", 900, "Top-k filtering (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 0.96, "Top-p filtering (0 = off).")
_SCHEDULE = flags.DEFINE_string(
  "mask_schedule", "none", "Per-scale mask schedule as JSON nested lists, 'none' or 'default'."
)
_MASK_CFG = flags.DEFINE_float("mask_cfg", 0.0, "Guidance of the masked refinement steps (official ~0).")
_KV = flags.DEFINE_bool("kv_cache", False, "Force VAR-style KV-cache sampling (automatic for VAR models).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed (same seed, same images).")
_OUT = flags.DEFINE_string("out", "samples.png", "Output PNG path.")


def load_transformer(params_dir: str):
  """A ScaleTransformer built from the model config stored with its parameters."""
  meta = checkpoint.load_metadata(params_dir)
  if "model" not in meta:
    raise ValueError(f"{params_dir} stores no model config (expected a training run's workdir/params)")
  model_config = upgrade_model_config(ml_collections.ConfigDict(meta["model"]))
  model = nnx.eval_shape(lambda: ScaleTransformer(model_config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
  return checkpoint.restore_params(params_dir, model)


def write_sample_grid(
  model,
  vqvae,
  out: str,
  *,
  classes=None,
  per_class: int = 8,
  cfg: float = 1.5,
  top_k: int = 900,
  top_p: float = 0.96,
  mask_schedule=None,
  mask_cfg: float = 0.0,
  seed: int = 0,
  kv_cache: bool = False,
) -> str:
  """Samples `per_class` images of each class (one grid row per class) and writes a PNG.

  Args as `hmar_jax.sampling.Sampler.sample_indices`; `mask_schedule` may be 'none',
  'default' (the official 256 px schedule), JSON text or nested lists. Returns the path.
  """
  if isinstance(mask_schedule, str) and mask_schedule.strip() == "default":
    mask_schedule = DEFAULT_MASK_SCHEDULE_256
  schedule = validate_mask_schedule(mask_schedule, model.patch_nums)  # fail before compiling
  classes = list(range(min(10, model.num_classes))) if not classes else [int(c) for c in classes]
  bad = [c for c in classes if not 0 <= c <= model.num_classes]
  if bad:
    raise ValueError(f"class ids {bad} outside [0, {model.num_classes}] ({model.num_classes} = unconditional)")
  sampler = Sampler(model, vqvae, use_kv_cache=True if kv_cache else None)
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  images = sampler.sample(labels, seed, cfg=cfg, top_k=top_k, top_p=top_p, mask_schedule=schedule, mask_cfg=mask_cfg)
  return save_image_grid(out, np.asarray(images), nrow=per_class)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _PARAMS.value or not _TOKENIZER.value:
    raise app.UsageError("--params and --tokenizer are required")
  model = load_transformer(_PARAMS.value)
  classes = [int(c) for c in _CLASSES.value.split(",") if c.strip()] if _CLASSES.value else None
  t0 = time.time()
  path = write_sample_grid(
    model,
    load_vqvae(_TOKENIZER.value),
    _OUT.value,
    classes=classes,
    per_class=_PER_CLASS.value,
    cfg=_CFG.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    mask_schedule=_SCHEDULE.value,
    mask_cfg=_MASK_CFG.value,
    seed=_SEED.value,
    kv_cache=_KV.value,
  )
  print(f"wrote samples to {path} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  cli.run(main)
