"""HMAR d30 at 256 px (official layout: width 1920, 30 heads, patch_nums 1..16)."""
import ml_collections

from hmar_jax.models.config import model_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config(30, kind="hmar")
  return config
