"""VAR / HMAR transformers (Flax NNX). See transformer.py for the API."""

from hmar_jax.models.config import model_config, tiny_model_config
from hmar_jax.models.transformer import (
  MASK_BRANCH,
  ScaleTransformer,
  check_model_config,
  count_params,
  is_mask_branch_path,
)

HMAR = ScaleTransformer  # the HMAR inference model is a ScaleTransformer with mask_layers > 0

__all__ = [
  "ScaleTransformer",
  "HMAR",
  "MASK_BRANCH",
  "model_config",
  "tiny_model_config",
  "check_model_config",
  "count_params",
  "is_mask_branch_path",
]
