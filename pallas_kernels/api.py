"""The one entry point for scale attention. Fast kernels plug in behind `implementation`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import pallas_tpu, patterns, triton_gpu
from pallas_kernels.reference import check_qkv, reference_attention

IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_interpret", "triton")
HEAD_DIMS = (64, 128)
# One scale's dense attention writes (B, H, N, N) float32 logits: 8.6 GB for HMAR's 64 x 64 scale
# at 1024 px (batch 4, doubled for guidance). Queries beyond this budget run in chunks; at 256 px
# no official depth up to d30 is cut at batch 64 (128 rows x 30 heads x 256^2 x 4 B = 1.0 GB).
SINGLE_SCALE_LOGITS_BYTES = 1 << 30


def resolve_implementation(implementation: str = "auto", backend: str | None = None) -> str:
  """The concrete implementation `auto` stands for on `backend` (default: JAX's default backend).

  TPU -> 'pallas_tpu'; CUDA GPU -> 'triton' when jax_triton imports, else 'xla'; CPU -> 'xla'.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "pallas_tpu"
  if backend in ("gpu", "cuda"):
    return "triton" if triton_gpu.available() else "xla"
  return "xla"


def _check_kernel_shapes(q: jax.Array) -> None:
  head_dim = q.shape[-1]
  if head_dim not in HEAD_DIMS:
    raise ValueError(
      f"scale attention kernels support head dim {HEAD_DIMS}, got {head_dim}; "
      "use implementation='xla' for other head dims"
    )
  if q.dtype.name not in ("bfloat16", "float16", "float32"):
    raise ValueError(f"scale attention kernels take bfloat16, float16 or float32, got {q.dtype}")


def scale_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  patch_nums: Sequence[int],
  pattern: str,
  *,
  scale: float | None = None,
  implementation: str = "auto",
  block_sizes: tuple[int, int] | None = None,
) -> jax.Array:
  """Block-sparse attention over multi-scale token sequences.

  Args:
    q, k, v: (B, L, H, D), L = sum(p * p for p in patch_nums), same dtype; the kernels take
      D in (64, 128) and bfloat16 / float16 / float32 (float32 softmax and accumulation).
    patch_nums: side lengths of the scales' token maps, small to large.
    pattern: 'block_causal' (VAR) or 'block_diagonal' (HMAR).
    scale: logit multiplier, default 1 / sqrt(D).
    implementation: 'auto' picks the fastest available on the backend (TPU: 'pallas_tpu', CUDA:
      'triton', else 'xla'); 'xla' the dense masked reference; 'pallas_tpu' the Mosaic kernels;
      'pallas_interpret' the same kernels interpreted (any backend, slow; for tests); 'triton'
      the jax-triton kernels (CUDA).
    block_sizes: (block_q, block_k) of the Pallas kernels; default (128, 128).
  Returns:
    (B, L, H, D) in q's dtype. Differentiable in q, k, v (custom VJP for the kernels).
  """
  implementation = resolve_implementation(implementation)
  patterns.check_pattern(pattern)
  check_qkv(q, k, v, patch_nums)
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if implementation == "xla":
    return reference_attention(q, k, v, patch_nums, pattern, scale=scale)
  _check_kernel_shapes(q)
  if implementation == "triton" and len(patch_nums) == 1:
    # One scale is plain dense attention (both patterns): XLA's fused attention is as fast there and
    # compiles no Triton kernel per scale shape, which is most of a sampler's first-call time.
    return single_scale_attention(q, k, v, scale)
  if implementation in ("pallas_tpu", "pallas_interpret"):
    bq, bk = block_sizes or (pallas_tpu.DEFAULT_BLOCK_Q, pallas_tpu.DEFAULT_BLOCK_K)
    return pallas_tpu.scale_attention_pallas(
      q, k, v, patch_nums, pattern, scale=scale, block_q=bq, block_k=bk, interpret=implementation == "pallas_interpret"
    )
  return triton_gpu.scale_attention_triton(q, k, v, patch_nums, pattern, scale=scale)


def single_scale_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float, max_logits_bytes: int = SINGLE_SCALE_LOGITS_BYTES
) -> jax.Array:
  """Dense attention of one scale's tokens, q, k, v (B, N, H, D) -> (B, N, H, D), through XLA's
  `jax.nn.dot_product_attention`, its queries in chunks whose float32 logits fit in
  `max_logits_bytes` (the last chunk zero-padded)."""
  b, n, h, _ = q.shape
  rows = max(1, max_logits_bytes // (b * h * k.shape[1] * 4))
  return in_query_chunks(lambda qc: jax.nn.dot_product_attention(qc, k, v, scale=scale), q, rows)


def in_query_chunks(attend: Callable[[jax.Array], jax.Array], q: jax.Array, rows: int) -> jax.Array:
  """attend(q) for q (B, N, H, D) -> (B, N, H, D), computed `rows` queries at a time (one after another
  in a loop, so only one chunk's logits live at once; the last chunk zero-padded)."""
  b, n, h, d = q.shape
  if rows >= n:
    return attend(q)
  chunks = -(-n // rows)
  q = jnp.pad(q, ((0, 0), (0, chunks * rows - n), (0, 0), (0, 0)))
  out = jax.lax.map(attend, q.reshape(b, chunks, rows, h, d).swapaxes(0, 1))
  return out.swapaxes(0, 1).reshape(b, chunks * rows, h, -1)[:, :n]
