"""HMAR d16 next-scale training at 256 px with the official recipe (GPU/TPU; not for CPU).

  python -m hmar_jax.train --config=configs/train_hmar_d16.py --workdir=runs/hmar_d16 \
      --config.tokenizer.checkpoint=ckpts/vae_ch160v4096z32 --config.data.data_dir=~/tensorflow_datasets

Official (HMAR config/experiment/hmar-train-d16.yaml, utils/arg_util.py): batch 768, 200 epochs,
base lr 1e-4 (peak 3e-4), wd 0.05, clip 2, 'lin0' schedule with ep/50 warmup from 0.005x to
wpe = 0.1x, 'lognorm' loss weights, mixed precision (here bf16 compute, f32 params),
alng 1e-3 (model.init_adaln_gamma); d24/d30 use 350 epochs, wpe 0.01, alng 1e-4 / 1e-5, and
d30 batch 1024; d24/d30 base lr 8e-5; d30 weight decay 0.05 -> 0.08 (cosine). The tokenizer is the official vae_ch160v4096z32 converted
with `python -m hmar_jax.convert vqvae`. Variants: `:d20`, `:d24`, `:d30`, and `:var` suffixes,
e.g. --config=configs/train_hmar_d16.py:d24 or :d16var.

Note: the loop runs data-parallel only through whatever jax.jit does on one device; batch 768
needs several accelerators (sharding the pure train step over a mesh is not wired in yet), so
lower train.batch_size on a single GPU.
"""

import ml_collections

from hmar_jax import config_utils
from hmar_jax.models.config import model_config

IMAGENET_TRAIN = 1_281_167


def _vqvae_official():
  return config_utils.sibling(__file__, "vqvae").get_config("256")


def get_config(variant: str = "d16") -> ml_collections.ConfigDict:
  variant = variant or "d16"
  kind = "var" if variant.endswith("var") else "hmar"
  depth = int(variant.replace("var", "").lstrip("d"))
  # Official per-depth settings (config/experiment/hmar-train-d*.yaml): epochs, batch, wpe, alng.
  epochs = {16: 200, 20: 250, 24: 350, 30: 350}.get(depth, 200)
  batch = 1024 if depth >= 30 else 768
  wpe = 0.1 if depth <= 20 else 0.01
  alng = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5}.get(depth, 1e-3)
  base_lr = 8e-5 if depth >= 24 else 1e-4
  wd_end = 0.08 if depth >= 30 else 0.05
  config = ml_collections.ConfigDict()
  config.task = "nsp"
  config.model = model_config(depth, kind=kind)
  config.model.dtype = "bfloat16"
  config.model.init_adaln_gamma = alng
  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.checkpoint = ""
  config.tokenizer.seed = 0
  config.tokenizer.config = _vqvae_official()
  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.name = "imagenet2012"
  config.data.split = "train"
  config.data.data_dir = ""
  config.data.tokens_cache = ""
  t = ml_collections.ConfigDict()
  t.seed = 0
  t.batch_size = batch
  t.num_steps = epochs * (IMAGENET_TRAIN // batch)
  t.base_lr = base_lr
  t.lr_schedule = "lin0"
  t.warmup_steps = -1
  t.warmup_frac = 0.02
  t.wp0 = 0.005
  t.wpe = wpe
  t.weight_decay = 0.05
  t.weight_decay_end = wd_end
  t.grad_clip = 2.0
  t.loss_weighting = "lognorm" if kind == "hmar" else "uniform"
  t.label_smoothing = 0.0
  t.ema_decay = 0.0
  t.log_every = 100
  t.checkpoint_every = 5000
  t.max_to_keep = 3
  config.train = t
  config.sample = ml_collections.ConfigDict()
  config.sample.grid_at_end = False
  return config
