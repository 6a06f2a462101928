"""Plain-XLA masked scale attention: the reference every kernel is tested against.

Layout follows `jax.nn.dot_product_attention`: q, k, v are (B, L, H, D).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import patterns


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, patch_nums: Sequence[int]) -> None:
  """Raises ValueError naming the problem if shapes do not fit `patch_nums`."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be (B, L, H, D); got shapes {q.shape}, {k.shape}, {v.shape}")
  if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
    raise ValueError(f"q, k, v must have the same sequence length (axis 1); got shapes {q.shape}, {k.shape}, {v.shape}")
  if q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"q, k, v must have the same shape; got {q.shape}, {k.shape}, {v.shape}")
  length = patterns.sequence_length(patch_nums)
  if q.shape[1] != length:
    raise ValueError(
      f"sequence length {q.shape[1]} does not match patch_nums {tuple(patch_nums)} (sum of squares = {length})"
    )


def reference_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, patch_nums: Sequence[int], pattern: str, *, scale: float | None = None
) -> jax.Array:
  """Dense masked attention with float32 softmax.

  Args:
    q, k, v: (B, L, H, D) with L = sum(p * p for p in patch_nums).
    patch_nums: side lengths of the scales' token maps.
    pattern: 'block_causal' or 'block_diagonal'.
    scale: logit multiplier, default 1 / sqrt(D).
  Returns:
    (B, L, H, D) in q's dtype.
  """
  check_qkv(q, k, v, patch_nums)
  patterns.check_pattern(pattern)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  mask = jnp.asarray(patterns.dense_mask(patch_nums, pattern))
  logits = jnp.einsum("blhd,bmhd->bhlm", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhlm,bmhd->blhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def numpy_attention_f64(q, k, v, patch_nums: Sequence[int], pattern: str, *, scale: float | None = None, d_out=None):
  """Float64 NumPy masked attention and, given `d_out`, its exact VJP: the test oracle.

  Args:
    q, k, v: (B, L, H, D) array-likes (upcast to float64).
    d_out: optional (B, L, H, D) cotangent of the output.
  Returns:
    out (B, L, H, D) float64, or (out, (dq, dk, dv)) when `d_out` is given.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  if scale is None:
    scale = q.shape[-1] ** -0.5
  mask = patterns.dense_mask(patch_nums, pattern)
  logits = np.einsum("blhd,bmhd->bhlm", q, k) * scale
  logits = np.where(mask, logits, -np.inf)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  out = np.einsum("bhlm,bmhd->blhd", probs, v)
  if d_out is None:
    return out
  g = np.asarray(d_out, np.float64)
  dv = np.einsum("bhlm,blhd->bmhd", probs, g)
  dp = np.einsum("blhd,bmhd->bhlm", g, v)
  ds = probs * (dp - (dp * probs).sum(axis=-1, keepdims=True))
  dq = np.einsum("bhlm,bmhd->blhd", ds, k) * scale
  dk = np.einsum("bhlm,blhd->bmhd", ds, q) * scale
  return out, (dq, dk, dv)
