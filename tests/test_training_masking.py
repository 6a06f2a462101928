"""Random token masks for masked-prediction finetuning."""

import math

import jax
import numpy as np
import pytest

from hmar_jax.training import masking

PATCH_NUMS = (1, 2, 3, 4, 5)


@pytest.mark.parametrize("p", [0.03, 0.25, 0.5, 0.61, 0.999])
def test_each_scale_masks_ceil_p_n_tokens_and_the_1x1_is_never_an_input(p):
  mask = np.asarray(masking.draw_token_mask(jax.random.key(1), PATCH_NUMS, 3, p, same_positions_for_batch=False))
  assert mask.shape == (3, sum(q * q for q in PATCH_NUMS) - 1)  # no position for the 1x1 scale
  ids = masking.scale_ids_without_first(PATCH_NUMS)
  assert ids.min() == 1
  for k, pn in enumerate(PATCH_NUMS[1:], start=1):
    counts = mask[:, ids == k].sum(-1)
    np.testing.assert_array_equal(counts, math.ceil(p * pn * pn))


def test_positions_are_random_and_official_default_shares_them_across_the_batch():
  shared = np.asarray(masking.draw_token_mask(jax.random.key(0), PATCH_NUMS, 4, 0.5))
  assert (shared == shared[:1]).all()
  per_example = np.asarray(
    masking.draw_token_mask(jax.random.key(0), PATCH_NUMS, 64, 0.5, same_positions_for_batch=False)
  )
  assert len({row.tobytes() for row in per_example}) > 1
  # Every position of the 5x5 scale gets masked by some example (uniform positions).
  assert per_example[:, masking.scale_ids_without_first(PATCH_NUMS) == 4].any(0).all()


def test_ratio_is_uniform_on_unit_interval():
  ps = np.array([float(masking.draw_mask_ratio(k)) for k in jax.random.split(jax.random.key(0), 200)])
  assert ps.min() >= 0 and ps.max() < 1 and 0.4 < ps.mean() < 0.6
