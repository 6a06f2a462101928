"""HMAR next-scale training (task 'nsp'). Defaults: hmar_jax/training/schema.py.

  python -m hmar_jax.train --config=configs/hmar.py:tiny --workdir=runs/hmar_nsp \\
      --config.tokenizer.checkpoint=runs/tokenizer_tiny/tokenizer                      # CPU, minutes
  python -m hmar_jax.train --config=configs/hmar.py:d16 --workdir=runs/hmar_d16 \\
      --config.tokenizer.checkpoint=checkpoints/vae --config.data.data_dir=/data/tfds      # ImageNet, 8+ accelerators

Variants: tiny; d16, d20, d24, d30 (256 px); d16_512, d20_512, d24_512, d30_512 (512 px).

Official recipe (HMAR config/experiment/hmar-train-d*.yaml, utils/arg_util.py): AdamW (0.9, 0.95),
peak lr = base lr x batch / 256 (base 1e-4; 8e-5 for d24 / d30), weight decay 0.05 (d30: cosine to
0.08), grad clip 2, 'lin0' schedule with ep / 50 warmup from 0.005x to wpe (0.1 for d16 / d20,
0.01 for d24 / d30), 'lognorm' loss weights, mixed precision (here bf16 compute, f32 parameters),
batch 768 (d30: 1024), 200 / 250 / 350 / 350 epochs, init_adaln_gamma 1e-3 / 1e-3 / 1e-4 / 1e-5.
The tokenizer is the official vae_ch160v4096z32 (`python -m hmar_jax.convert vqvae`).
The official-size variants shard with FSDP over all devices (mesh (1, -1, 1)). At 256 px up to d24
they run a list of blocks with remat 'auto' (nothing recomputed unless the compiled step would not
fit in memory, then the matmul outputs kept); d30 and 512 px scan their blocks and rematerialise all
but the matmul outputs (bench/results/train_step.json compares the choices).
"""

from __future__ import annotations

import ml_collections

from hmar_jax.models.config import PATCH_NUMS_256, PATCH_NUMS_512, model_config
from hmar_jax.tokenizer.config import vqvae_config
from hmar_jax.training.schema import default_config

IMAGENET_TRAIN = 1_281_167
DEPTHS = (16, 20, 24, 30)


def tiny_tokenizer() -> ml_collections.ConfigDict:
  """The VQVAE of configs/tokenizer.py:tiny (32 px, patch_nums 1,2,3,4,6,8, V 256, Cvae 16)."""
  m = vqvae_config("tiny")
  m.ch, m.ch_mult, m.num_res_blocks, m.norm_groups = 32, (1, 2, 2), 1, 16
  m.vocab_size, m.z_channels, m.patch_nums, m.image_size = 256, 16, (1, 2, 3, 4, 6, 8), 32
  return m


def tiny(kind: str) -> ml_collections.ConfigDict:
  """A CPU-sized HMAR / VAR over the tiny tokenizer's scales: depth 4, width 128, 4 heads."""
  c = default_config("nsp")
  tok = tiny_tokenizer()
  c.tokenizer.config = tok
  c.model = model_config(
    4,
    kind=kind,
    patch_nums=tuple(tok.patch_nums),
    width=128,
    num_heads=4,
    vocab_size=tok.vocab_size,
    cvae=tok.z_channels,
    num_classes=10,
    mask_layers=2 if kind == "hmar" else 0,
  )
  c.loss.weighting = "lognorm" if kind == "hmar" else "uniform"
  c.data.num_examples = 2000
  c.train.batch_size = 32
  c.train.num_steps = 600
  c.optim.lr = 8e-3  # peak = lr x batch / 256 = 1e-3 (official base 1e-4 at batch 768)
  c.optim.wpe = 0.1
  c.log.every_steps = 50
  c.checkpoint.every_steps = 200
  return c


def official(kind: str, depth: int, resolution: int = 256) -> ml_collections.ConfigDict:
  """The official per-depth recipe at 256 or 512 px on ImageNet (TFDS)."""
  if depth not in DEPTHS or resolution not in (256, 512):
    raise ValueError(f"official recipes exist for depths {DEPTHS} at 256 or 512 px, got d{depth} at {resolution}")
  c = default_config("nsp")
  patch_nums = PATCH_NUMS_256 if resolution == 256 else PATCH_NUMS_512
  c.model = model_config(depth, kind=kind, patch_nums=patch_nums)
  c.model.dtype = "bfloat16"
  if resolution == 256 and depth <= 24:
    # A list of blocks keeping every activation is the fastest step (bench/results/train_step.json);
    # where the compiled step would not fit in a device's memory, the trainer recompiles it keeping
    # only the matmul outputs ('auto').
    c.model.scan_layers = False
    c.model.remat_policy = "auto"
  else:
    c.model.scan_layers = True  # one compiled block: a first step within a minute
    c.model.remat_policy = "dots"  # keep matmul outputs, recompute the rest: half the memory
  c.model.init_adaln_gamma = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5}[depth]
  c.tokenizer.config = vqvae_config(str(resolution))
  c.loss.weighting = "lognorm" if kind == "hmar" else "uniform"
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.num_examples = 0
  c.data.num_classes = 1000
  c.mesh.shape = (1, -1, 1)
  epochs = {16: 200, 20: 250, 24: 350, 30: 350}[depth]
  c.train.batch_size = 1024 if depth >= 30 else 768
  c.train.num_steps = epochs * (IMAGENET_TRAIN // c.train.batch_size)
  c.optim.lr = 8e-5 if depth >= 24 else 1e-4
  c.optim.wpe = 0.1 if depth <= 20 else 0.01
  c.optim.weight_decay_end = 0.08 if depth >= 30 else -1.0
  c.log.every_steps = 100
  c.checkpoint.every_steps = 5000
  c.checkpoint.max_to_keep = 3
  c.sample.grid_at_end = False
  return c


VARIANTS = ("tiny",) + tuple(f"d{d}" for d in DEPTHS) + tuple(f"d{d}_512" for d in DEPTHS)


def parse_variant(variant: str) -> tuple[str, int, int]:
  """'tiny' -> ('tiny', 0, 0); 'd24' -> ('d', 24, 256); 'd16_512' -> ('d', 16, 512).

  Raises ValueError naming the variant and listing the valid ones."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
  if variant == "tiny":
    return "tiny", 0, 0
  name, _, res = variant.partition("_")
  return "d", int(name[1:]), int(res or 256)


def config_for(kind: str, variant: str) -> ml_collections.ConfigDict:
  family, depth, resolution = parse_variant(variant or "d16")
  return tiny(kind) if family == "tiny" else official(kind, depth, resolution)


def get_config(variant: str = "d16") -> ml_collections.ConfigDict:
  return config_for("hmar", variant)
