"""Multi-scale VQVAE (VAR's tokenizer) architecture configs (defaults: hmar_jax/tokenizer/config.py).

  get_config()          official vae_ch160v4096z32, 256 px, patch_nums 1..16 (10 scales, L = 680)
  get_config('512')     official weights, 512 px patch_nums (10 scales, L = 2240)
  get_config('1024')    official weights, 1024 px patch_nums (14 scales)
  get_config('tiny')    a small model for tests and CPU smoke runs (16 px images)

With ml_collections config_flags: `--config=configs/vqvae.py:tiny`.
"""

from __future__ import annotations

import ml_collections

from hmar_jax.tokenizer.config import PATCH_NUMS, official, tiny, vqvae_config

__all__ = ["PATCH_NUMS", "official", "tiny", "get_config"]


def get_config(variant: str = "256") -> ml_collections.ConfigDict:
  return vqvae_config(variant)
