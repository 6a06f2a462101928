"""Next-scale training of the tiny VAR (block-causal, uniform token loss) on the built-in data."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "hmar_jax_configs_train_hmar_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_hmar_tiny.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  config = _base.get_config()
  config.model = _base.tiny_transformer("var")
  config.train.loss_weighting = "uniform"   # VAR: plain token mean
  return config
