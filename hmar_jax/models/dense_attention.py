"""Full (dense) multi-head attention of the MAR / Hi-MAR backbones and the DiT head.

Two implementations of one function, softmax(q k^T * scale) v over keys a per-row length may cut:

  'xla'    einsums with float32 logits and softmax, written out in HBM (any dtype, any head dim,
           dropout on the probabilities); the reference the other is tested against.
  'cudnn'  cuDNN's fused flash attention through `jax.nn.dot_product_attention` (CUDA GPUs,
           bfloat16 / float16, head dim a multiple of 8 up to 128; no dropout): the logits never
           leave on-chip memory. The official code runs timm's Attention, which calls PyTorch's
           fused scaled_dot_product_attention, so this is the like-for-like path on a GPU.
  'auto'   'cudnn' where it applies (a GPU backend, a supported dtype and head dim, no dropout
           this call), else 'xla'.

Shapes: q, k, v (B, N, H, D) (the BTNH layout cuDNN takes directly); kv_lengths (B,) int32: row
b attends to keys [0, kv_lengths[b]) only (the encoder's kept tokens are gathered to the front
of its buffer, so the valid keys are always a prefix); every query row is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
DEFAULT_IMPLEMENTATION = "auto"
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention: head dim a multiple of 8, at most 128 before Hopper


def check_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


def cudnn_unsupported(dtype, head_dim: int, dropout: bool) -> str | None:
  """Why cuDNN's fused attention cannot run this call, or None when it can."""
  if jnp.dtype(dtype).name not in CUDNN_DTYPES:
    return f"it takes {' / '.join(CUDNN_DTYPES)} inputs, got {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return f"it takes a head dim that is a multiple of 8 and at most {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
  if dropout:
    return "it has no dropout on the attention probabilities (training with attn_dropout > 0 needs 'xla')"
  return None


def resolve_implementation(
  implementation: str, *, dtype, head_dim: int, dropout: bool, backend: str | None = None
) -> str:
  """The concrete implementation ('xla' or 'cudnn') of `implementation` for one call.

  An explicit 'cudnn' that cannot run raises ValueError naming why; 'auto' falls back to 'xla'.
  backend: default JAX's default backend.
  """
  check_implementation(implementation)
  if implementation == "xla":
    return "xla"
  why = cudnn_unsupported(dtype, head_dim, dropout)
  if implementation == "cudnn":
    if why:
      raise ValueError(f"attention implementation 'cudnn' cannot run here: {why}")
    return "cudnn"
  backend = backend or jax.default_backend()
  return "cudnn" if backend in ("gpu", "cuda") and why is None else "xla"


def dense_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  kv_lengths: jax.Array | None = None,
  implementation: str = "xla",
  probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v -> (B, N, H, D) in v's dtype.

  q, k, v: (B, N, H, D); kv_lengths: (B,) int, keys at positions >= kv_lengths[b] are not attended
  to by row b (None: all are); implementation: 'xla' or 'cudnn' (resolve 'auto' first with
  `resolve_implementation`); probs_dropout: applied to the probabilities ('xla' only).
  """
  head_dim = q.shape[-1]
  scale = head_dim**-0.5
  if implementation == "cudnn":
    if probs_dropout is not None:
      raise ValueError("attention implementation 'cudnn' has no dropout on the probabilities")
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return jax.nn.dot_product_attention(
      q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
    ).astype(v.dtype)
  if implementation != "xla":
    raise ValueError(f"dense_attention takes implementation 'xla' or 'cudnn', got {implementation!r}")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if kv_lengths is not None:
    valid = jnp.arange(k.shape[1])[None, :] < jnp.asarray(kv_lengths)[:, None]
    # a finite floor (not -inf): a row with no valid key (never made by the models) cannot give NaN
    logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if probs_dropout is not None:
    probs = probs_dropout(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
