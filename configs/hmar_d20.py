"""HMAR d20 at 256 px (official layout: width 1280, 20 heads, patch_nums 1..16)."""
import ml_collections

from hmar_jax.models.config import model_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config(20, kind="hmar")
  return config
