"""Next-scale training of the tiny VAR (block-causal, uniform token loss) on the built-in data."""
from hmar_jax import config_utils

_base = config_utils.sibling(__file__, "train_hmar_tiny")


def get_config():
  config = _base.get_config()
  config.model = _base.tiny_transformer("var")
  config.train.loss_weighting = "uniform"   # VAR: plain token mean
  return config
