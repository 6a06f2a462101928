"""Float64 NumPy scale attention written for the tests, independent of pallas_kernels.

The masks are built token by token from the definition of the two patterns, not from
pallas_kernels.patterns (whose ranges the kernels' schedules are derived from): a token
sequence is the scales' token maps one after the other, scale k holding patch_nums[k] ** 2
tokens, and
  block_causal   (VAR):  query i may see key j  iff  scale(j) <= scale(i)
  block_diagonal (HMAR): query i may see key j  iff  scale(j) == scale(i)
"""

import numpy as np


def token_scales(patch_nums) -> np.ndarray:
  """(L,) the scale index of every token, counted out one token at a time."""
  scales = []
  for k, p in enumerate(patch_nums):
    scales += [k] * (p * p)
  return np.asarray(scales)


def scale_mask(patch_nums, pattern: str) -> np.ndarray:
  """(L, L) bool: entry [i, j] is True where query i may attend to key j."""
  s = token_scales(patch_nums)
  query, key = s[:, None], s[None, :]
  if pattern == "block_causal":
    return key <= query
  if pattern == "block_diagonal":
    return key == query
  raise ValueError(pattern)


def attention_f64(q, k, v, patch_nums, pattern: str, d_out=None):
  """Masked softmax attention in float64, and its VJP given the output cotangent `d_out`.

  q, k, v, d_out: (B, L, H, D) array-likes; logits scaled by 1 / sqrt(D).
  Returns out (B, L, H, D), or (out, (dq, dk, dv)) when d_out is given.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scale = 1.0 / np.sqrt(q.shape[-1])
  mask = scale_mask(patch_nums, pattern)
  logits = np.einsum("bihd,bjhd->bhij", q, k) * scale
  # Every row has at least its own token, so subtracting the row max over allowed keys is safe.
  row_max = np.where(mask, logits, -np.inf).max(axis=-1, keepdims=True)
  weights = np.where(mask, np.exp(logits - row_max), 0.0)
  p = weights / weights.sum(axis=-1, keepdims=True)
  out = np.einsum("bhij,bjhd->bihd", p, v)
  if d_out is None:
    return out
  g = np.asarray(d_out, np.float64)
  dv = np.einsum("bhij,bihd->bjhd", p, g)
  dp = np.einsum("bihd,bjhd->bhij", g, v)
  # Softmax VJP: dlogits = p * (dp - sum_j p dp).
  dlogits = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
  dq = np.einsum("bhij,bjhd->bihd", dlogits, k) * scale
  dk = np.einsum("bhij,bihd->bjhd", dlogits, q) * scale
  return out, (dq, dk, dv)
