"""Masked-prediction finetuning of the tiny HMAR (after configs/train_hmar_tiny.py).

  python -m hmar_jax.train --config=configs/train_hmar_tiny_mask.py --workdir=runs/hmar_mask \
      --config.init_from=runs/hmar_nsp/params --config.tokenizer.checkpoint=runs/tokenizer_tiny/tokenizer

Official (config/experiment/hmar-finetune-mask-d*.yaml): same optimiser recipe, loss
'mask_unweighted' (mean CE over the masked tokens), n_layers_train 8 (here model.mask_layers).
"""
from hmar_jax import config_utils

_base = config_utils.sibling(__file__, "train_hmar_tiny")


def get_config():
  config = _base.get_config()
  config.task = "mask_finetune"
  config.init_from = ""                     # the next-scale run's workdir/params
  # Set config.data.tokens_cache to the next-scale run's workdir/tokens.npz to skip re-tokenising.
  config.train = _base.train_config(num_steps=300)
  config.train.loss_weighting = "mask_unweighted"
  config.train.same_mask_positions_for_batch = True   # official: one set of masked positions per batch
  # Refine the 2x2 and 3x3 scales in several steps, as the official default does.
  config.sample.mask_schedule = "[[1], [1, 3], [1, 1, 2, 5], [16], [36], [64]]"
  return config
