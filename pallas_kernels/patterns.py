"""Scale-attention sparsity patterns derived from `patch_nums`.

A token sequence is the concatenation of the scales' token maps, scale k holding
`patch_nums[k] ** 2` tokens. Two patterns exist:

* ``block_causal`` (VAR): a token of scale k attends to every token of scales <= k.
* ``block_diagonal`` (HMAR): a token of scale k attends to the tokens of scale k only
  (the Markovian formulation: earlier scales are seen through the input, not attention).

Everything here is NumPy and static: it runs at trace time, never on device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PATTERNS = ("block_causal", "block_diagonal")


def check_pattern(pattern: str) -> None:
  if pattern not in PATTERNS:
    raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")


def check_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """Validates and returns `patch_nums` as a tuple of positive ints."""
  pns = tuple(int(p) for p in patch_nums)
  if not pns or any(p <= 0 for p in pns):
    raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {patch_nums!r}")
  return pns


def scale_lengths(patch_nums: Sequence[int]) -> np.ndarray:
  """(S,) number of tokens of each scale: patch_nums[k] ** 2."""
  return np.asarray(check_patch_nums(patch_nums), np.int64) ** 2


def scale_bounds(patch_nums: Sequence[int]) -> np.ndarray:
  """(S + 1,) token offsets: scale k spans [bounds[k], bounds[k + 1])."""
  return np.concatenate([[0], np.cumsum(scale_lengths(patch_nums))])


def sequence_length(patch_nums: Sequence[int]) -> int:
  """Total tokens L over all scales (680 for the 256 px layout)."""
  return int(scale_lengths(patch_nums).sum())


def scale_ids(patch_nums: Sequence[int]) -> np.ndarray:
  """(L,) int32: the scale index of every token."""
  lengths = scale_lengths(patch_nums)
  return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def key_ranges(patch_nums: Sequence[int], pattern: str) -> tuple[np.ndarray, np.ndarray]:
  """Per query token, the half-open key range [start, end) it may attend to.

  Returns:
    (starts, ends), each (L,) int32.
  """
  check_pattern(pattern)
  bounds = scale_bounds(patch_nums)
  ids = scale_ids(patch_nums)
  ends = bounds[ids + 1].astype(np.int32)
  starts = bounds[ids].astype(np.int32) if pattern == "block_diagonal" else np.zeros_like(ends)
  return starts, ends


def dense_mask(patch_nums: Sequence[int], pattern: str) -> np.ndarray:
  """(L, L) bool: mask[i, j] is True where query i may attend to key j."""
  starts, ends = key_ranges(patch_nums, pattern)
  cols = np.arange(len(starts))[None, :]
  return (cols >= starts[:, None]) & (cols < ends[:, None])
