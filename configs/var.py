"""VAR next-scale training (task 'nsp', block-causal attention, uniform loss weights).

  python -m hmar_jax.train --config=configs/var.py:tiny --workdir=runs/var_nsp \\
      --config.tokenizer.checkpoint=runs/tokenizer_tiny/tokenizer

Variants as configs/hmar.py (tiny, d16 .. d30, _512); the same recipe with pattern 'block_causal',
no masked branch and VAR's 'uniform' loss weighting.
"""

from hmar_jax import config_utils

_hmar = config_utils.sibling(__file__, "hmar")


def get_config(variant: str = "d16"):
  return _hmar.config_for("var", variant)
