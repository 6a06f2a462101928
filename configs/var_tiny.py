"""A tiny VAR for CPU tests and smoke runs (matches configs/vqvae.py:tiny)."""
import ml_collections

from hmar_jax.models.config import tiny_model_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = tiny_model_config("var")
  return config
