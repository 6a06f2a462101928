"""Per-token loss weights: VAR uniform, HMAR 'equal' and 'lognorm'."""

import math

import numpy as np
import pytest

from hmar_jax.training import loss_weights

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# The closed-form HMAR 'lognorm' shares for 256 px (HMAR paper), to 3 decimals.
LOGNORM_256 = (0.025, 0.064, 0.115, 0.138, 0.140, 0.133, 0.121, 0.105, 0.088, 0.071)


def _independent_lognorm(patch_nums):
  """float64, written from the formula: N(0,1) pdf at the standardised reversed sizes, normalised."""
  k = patch_nums[-1]
  sizes = [p / k for p in patch_nums]
  mean = sum(sizes) / len(sizes)
  std = math.sqrt(sum((s - mean) ** 2 for s in sizes) / (len(sizes) - 1))
  pdf = [math.exp(-(((s - mean) / std) ** 2) / 2) / math.sqrt(2 * math.pi) for s in reversed(sizes)]
  return [p / sum(pdf) for p in pdf]


def _per_scale_sums(weights, patch_nums):
  bounds = np.cumsum([0] + [p * p for p in patch_nums])
  return np.array([weights[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])


def test_lognorm_shares_match_closed_form_values():
  w = loss_weights.token_loss_weights(PATCH_NUMS_256, "lognorm")
  shares = _per_scale_sums(w.astype(np.float64), PATCH_NUMS_256)
  np.testing.assert_allclose(shares, _independent_lognorm(PATCH_NUMS_256), atol=1e-6)
  np.testing.assert_array_equal(np.round(shares, 3), LOGNORM_256)


def test_lognorm_weights_sum_to_one_and_are_even_within_a_scale():
  w = loss_weights.token_loss_weights(PATCH_NUMS_256, "lognorm")
  assert w.shape == (sum(p * p for p in PATCH_NUMS_256),)
  assert abs(float(w.astype(np.float64).sum()) - 1.0) < 1e-5
  bounds = np.cumsum([0] + [p * p for p in PATCH_NUMS_256])
  for a, b in zip(bounds[:-1], bounds[1:]):
    assert np.ptp(w[a:b]) == 0


def test_uniform_is_token_mean_and_equal_gives_each_scale_one():
  pn = (1, 2, 4)
  np.testing.assert_allclose(loss_weights.token_loss_weights(pn, "uniform"), np.full(21, 1 / 21), rtol=1e-6)
  np.testing.assert_allclose(_per_scale_sums(loss_weights.token_loss_weights(pn, "equal"), pn), [1, 1, 1], rtol=1e-6)


def test_unknown_kind_is_rejected():
  with pytest.raises(ValueError, match="unknown loss weighting"):
    loss_weights.token_loss_weights(PATCH_NUMS_256, "cubic")
