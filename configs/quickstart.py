"""The README's main job: tokenizer -> HMAR next-scale -> masked finetuning -> samples, on CPU.

  python -m hmar_jax.main                       # this config, workdir runs/quickstart
  python -m hmar_jax.main --config.nsp.train.num_steps=1000
  python -m hmar_jax.main --family=mar          # configs/quickstart.py:mar: KL VAE -> MAR -> samples
  python -m hmar_jax.main --family=himar        # configs/quickstart.py:himar: KL VAE -> Hi-MAR -> samples

Each stage is a complete config of its own task (the same ones `python -m hmar_jax.train`
takes); this file only ties them together so that the transformer is built for the tokenizer
that was just trained (same patch_nums, codebook size and latent width).
"""

import ml_collections

from hmar_jax import config_utils


def _load(name: str):
  return config_utils.sibling(__file__, name)


def get_config(family: str = "hmar") -> ml_collections.ConfigDict:
  family = family or "hmar"
  if family in ("mar", "himar"):
    return mar_config(family)
  if family != "hmar":
    raise ValueError(f"unknown quick-start family {family!r}; valid: hmar, mar, himar")
  tokenizer = _load("tokenizer").get_config("tiny")

  # configs/hmar.py:tiny builds a depth-4 HMAR over configs/tokenizer.py:tiny's token maps
  # (32 px, scales 1..8, 256 codes); hmar_jax.main fills in the checkpoint paths.
  nsp = _load("hmar").get_config("tiny")
  nsp.tokenizer.config = tokenizer.model
  nsp.data.num_examples = 4000
  nsp.train.num_steps = 1000
  nsp.sample.grid_at_end = False  # main samples once, after finetuning

  mask = _load("hmar_mask").get_config("tiny")
  mask.model = nsp.model
  mask.tokenizer.config = tokenizer.model
  mask.data = ml_collections.ConfigDict(nsp.data.to_dict())
  mask.train.num_steps = 300
  mask.sample.grid_at_end = False

  c = ml_collections.ConfigDict()
  c.tokenizer = tokenizer
  c.nsp = nsp
  c.mask = mask
  c.sample = ml_collections.ConfigDict()
  c.sample.per_class = 8
  c.sample.cfg = 2.0
  c.sample.top_k = 0
  c.sample.top_p = 0.0
  # Official-style schedule for scales 1,2,3,4,6,8: refine the 2x2 .. 4x4 maps in several steps.
  # Text (JSON, 'none' or 'default'), so that --config.sample.mask_schedule can replace it.
  c.sample.mask_schedule = "[[1], [1, 3], [1, 2, 6], [4, 6, 6], [36], [64]]"
  c.sample.seed = 0
  return c


def mar_config(family: str = "mar") -> ml_collections.ConfigDict:
  """MAR's (or Hi-MAR's) quick start: the tiny KL VAE (configs/kl_tokenizer.py:tiny), then the tiny
  MAR (configs/mar.py:tiny) or Hi-MAR (configs/himar.py:tiny) over its latents, then a sample grid."""
  tokenizer = _load("kl_tokenizer").get_config("tiny")
  model = _load(family).get_config("tiny")
  model.tokenizer.config = tokenizer.model
  model.data.num_examples = 4000
  model.train.num_steps = 1000
  model.sample.grid_at_end = False  # main samples once, at the end
  c = ml_collections.ConfigDict()
  c.tokenizer = tokenizer
  c[family] = model
  c.sample = ml_collections.ConfigDict()
  c.sample.per_class = 8
  c.sample.num_iter = 8 if family == "mar" else 4
  c.sample.cfg = 2.0
  if family == "himar":
    c.sample.re_cfg = 2.0
  c.sample.cfg_schedule = "linear"
  c.sample.temperature = 1.0
  c.sample.seed = 0
  return c
