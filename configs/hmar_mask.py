"""HMAR masked-prediction finetuning (task 'mask_finetune'), after next-scale training.

  python -m hmar_jax.train --config=configs/hmar_mask.py:tiny --workdir=runs/hmar_mask \\
      --config.init_from=runs/hmar_nsp/params --config.tokenizer.checkpoint=runs/tokenizer_tiny/tokenizer

Official (config/experiment/hmar-finetune-mask-d*.yaml): the next-scale recipe, loss
'mask_unweighted' (mean CE over the masked tokens), n_layers_train 8 (here model.mask_layers);
one set of masked positions per batch. Variants as configs/hmar.py.
"""

from hmar_jax import config_utils
from hmar_jax.training.schema import default_config

_hmar = config_utils.sibling(__file__, "hmar")


def get_config(variant: str = "d16"):
  variant = variant or "d16"
  base = _hmar.config_for("hmar", variant)
  c = default_config("mask_finetune")
  for section in ("model", "tokenizer", "data", "train", "optim", "mesh", "checkpoint", "log"):
    c[section] = base[section]
  c.loss.label_smoothing = base.loss.label_smoothing
  family, _, resolution = _hmar.parse_variant(variant)
  if family == "tiny":
    c.train.num_steps = 300
    # Refine the 2x2 and 3x3 scales in several steps, as the official default does.
    c.sample.mask_schedule = "[[1], [1, 3], [1, 1, 2, 5], [16], [36], [64]]"
  else:
    c.sample.grid_at_end = False
    # 'default' is the official schedule of the 256 px scales; at 512 px give one as JSON.
    c.sample.mask_schedule = "default" if resolution == 256 else "none"
  return c
