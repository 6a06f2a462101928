"""The one entry point for scale attention. Fast kernels plug in behind `implementation`."""
from __future__ import annotations

from typing import Sequence

import jax

from pallas_kernels import patterns
from pallas_kernels.reference import check_qkv, reference_attention

IMPLEMENTATIONS = ("auto", "xla")


def scale_attention(q: jax.Array, k: jax.Array, v: jax.Array, patch_nums: Sequence[int],
                    pattern: str, *, scale: float | None = None,
                    implementation: str = "auto") -> jax.Array:
  """Block-sparse attention over multi-scale token sequences.

  Args:
    q, k, v: (B, L, H, D), L = sum(p * p for p in patch_nums).
    patch_nums: side lengths of the scales' token maps, small to large.
    pattern: 'block_causal' (VAR) or 'block_diagonal' (HMAR).
    scale: logit multiplier, default 1 / sqrt(D).
    implementation: 'auto' picks the fastest available on the backend; 'xla' the dense
      masked reference.
  Returns:
    (B, L, H, D) in q's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  patterns.check_pattern(pattern)
  check_qkv(q, k, v, patch_nums)
  return reference_attention(q, k, v, patch_nums, pattern, scale=scale)
