"""Per-token loss weights for next-scale prediction, one entry per token of the pyramid.

Kinds (official HMAR trainer.Trainer.get_loss_weight; VAR trainer.py):
  'uniform'  VAR's default: every token 1 / L, so the loss is the plain token mean.
  'equal'    every scale counts the same: token weight 1 / pn**2 (the weights sum to
             the number of scales, as officially: the loss is the *sum* of per-scale means).
  'lognorm'  HMAR's recipe: a standard normal pdf evaluated at the standardised,
             *reversed* relative scale sizes, normalised to sum to 1 over scales, and each
             scale's share split evenly over its pn**2 tokens (official
             Trainer.norm_dist_equivalent). For the 256 px schedule the per-scale shares
             are .025 .064 .115 .138 .140 .133 .121 .105 .088 .071.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

KINDS = ("uniform", "equal", "lognorm")


def _check_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
  patch_nums = tuple(int(p) for p in patch_nums)
  if len(patch_nums) < 2 or any(p < 1 for p in patch_nums):
    raise ValueError(f"patch_nums must list at least two positive grid sizes, got {patch_nums}")
  return patch_nums


def lognorm_scale_shares(patch_nums: Sequence[int]) -> np.ndarray:
  """The 'lognorm' share of the loss given to each scale, (S,) float64 summing to 1."""
  patch_nums = _check_patch_nums(patch_nums)
  sizes = np.asarray(patch_nums, np.float64) / patch_nums[-1]
  mean, std = sizes.mean(), sizes.std(ddof=1)  # official: sample standard deviation
  z = (sizes[::-1] - mean) / std  # official: the *reversed* sizes are standardised
  density = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
  return density / density.sum()


def scale_shares(patch_nums: Sequence[int], kind: str) -> np.ndarray:
  """Total weight given to each scale, (S,) float64."""
  patch_nums = _check_patch_nums(patch_nums)
  tokens = np.asarray([p * p for p in patch_nums], np.float64)
  if kind == "uniform":
    return tokens / tokens.sum()
  if kind == "equal":
    return np.ones(len(patch_nums))
  if kind == "lognorm":
    return lognorm_scale_shares(patch_nums)
  raise ValueError(f"unknown loss weighting {kind!r}; expected one of {KINDS}")


def token_loss_weights(patch_nums: Sequence[int], kind: str) -> np.ndarray:
  """Per-token weights (L,) float32, L = sum(pn**2), scale by scale in raster order.

  The training loss is sum_l w_l * CE_l per example, averaged over the batch.
  """
  patch_nums = _check_patch_nums(patch_nums)
  shares = scale_shares(patch_nums, kind)
  return np.concatenate([np.full(p * p, s / (p * p)) for p, s in zip(patch_nums, shares)]).astype(np.float32)
