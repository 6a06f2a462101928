"""Random token masks for masked-prediction finetuning (official quant.idxBl_to_mask_input).

Each step draws one ratio p ~ U(0, 1); every scale except the first (the 1x1 start
scale, which is never an input) masks ceil(p * pn**2) of its tokens, at positions drawn
uniformly without replacement. Officially the same positions are used for the whole
batch; `same_positions_for_batch=False` draws them per example instead.

Masks cover the teacher-forcing layout, i.e. the L - patch_nums[0]**2 positions of
scales 1..S-1 (the model's inputs "without the first l").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def masked_scale_sizes(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """Token counts of the maskable scales (all but the first)."""
  return tuple(int(p) * int(p) for p in patch_nums[1:])


def mask_counts(patch_nums: Sequence[int], p: jax.Array | float) -> jax.Array:
  """ceil(p * pn**2) for every scale but the first: (S - 1,) int32."""
  sizes = jnp.asarray(masked_scale_sizes(patch_nums), jnp.float32)
  return jnp.ceil(jnp.asarray(p, jnp.float32) * sizes).astype(jnp.int32)


def draw_mask_ratio(key: jax.Array) -> jax.Array:
  """p ~ U(0, 1), float32 scalar (official: random.random() per step)."""
  return jax.random.uniform(key, (), jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("same_positions_for_batch",))
def draw_token_mask(
  key: jax.Array,
  patch_nums: tuple[int, ...],
  batch_size: int,
  p: jax.Array | float,
  *,
  same_positions_for_batch: bool = True,
) -> jax.Array:
  """Which input tokens to replace by the mask embedding.

  Args:
    key: PRNG key.
    patch_nums: the scale grid sizes (a tuple: it is a compile-time constant).
    batch_size: B.
    p: the mask ratio in [0, 1] (a traced scalar is fine: shapes do not depend on it).
    same_positions_for_batch: official behaviour (one set of positions for the batch).
  Returns:
    (B, L - patch_nums[0]**2) bool, True = masked; scale k holds exactly ceil(p * pn_k**2).
  """
  counts = mask_counts(patch_nums, p)
  rows = 1 if same_positions_for_batch else batch_size
  keys = jax.random.split(key, len(patch_nums) - 1)
  parts = []
  for k, n in enumerate(masked_scale_sizes(patch_nums)):
    noise = jax.random.uniform(keys[k], (rows, n))
    rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)  # a uniformly random permutation of 0..n-1
    parts.append(rank < counts[k])
  mask = jnp.concatenate(parts, axis=-1)
  return jnp.broadcast_to(mask, (batch_size, mask.shape[-1]))


def scale_ids_without_first(patch_nums: Sequence[int]) -> np.ndarray:
  """Scale index of each teacher-forcing position: (L - patch_nums[0]**2,) int32, values 1..S-1."""
  return np.concatenate([np.full(p * p, k, np.int32) for k, p in enumerate(patch_nums)][1:])
