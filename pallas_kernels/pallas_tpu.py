"""Block-sparse scale attention as Pallas TPU (Mosaic) kernels: forward, dQ, and dK/dV.

Each kernel runs over a flat list of the (query tile, key tile) pairs the pattern touches
(`tiling.TileSchedule`), packed one int32 per pair; the list is passed by scalar prefetch (SMEM)
and the BlockSpec index maps read it,
so untouched tiles cost neither a DMA nor a grid step. Pairs of one output tile are consecutive,
so the output block stays resident in VMEM across them and is written back once.

Layout inside: (B, H, L_pad, D) with L padded to whole tiles; the wrapper transposes and pads once.
Rows past L get the empty key range [0, 0); columns past L are outside every row's range, so the
in-kernel mask (applied only on tiles that are not full) also handles ragged edge tiles.
Softmax statistics and accumulators are float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import patterns, tiling

# Finite stand-in for -inf on masked logits: keeps exp(s - m) free of inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128


def _precision(dtype):
  # float32 inputs get full float32 matmuls (the MXU's default would round them to bfloat16).
  # Others say DEFAULT explicitly: None would follow jax_default_matmul_precision, and Mosaic
  # refuses a float32-precision contraction of bfloat16 operands ("Bad lhs type").
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _tile_mask(k_tile, starts, ends, block_k):
  """(bq, bk) bool: column c of key tile `k_tile` is inside row r's range [starts[r], ends[r])."""
  bq = starts.shape[0]
  cols = k_tile * block_k + jax.lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)
  return (cols >= starts) & (cols < ends)


def _on_mask_flag(flag, body):
  """Runs body(masked=True) on partial tiles and body(masked=False) on full ones."""
  pl.when(flag != 0)(lambda: body(True))
  pl.when(flag == 0)(lambda: body(False))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(pairs_ref, q_ref, k_ref, v_ref, st_ref, en_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, block_k):
  p = pl.program_id(2)
  pair = _Pair(pairs_ref[p])

  @pl.when(pair.first != 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(apply_mask):
    q = q_ref[...]
    k = k_ref[...]
    prec = _precision(q.dtype)
    s = jax.lax.dot_general(q, k, NT_DIMS, precision=prec, preferred_element_type=jnp.float32) * scale
    if apply_mask:
      mask = _tile_mask(pair.k_tile, st_ref[...], en_ref[...], block_k)
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    probs = jnp.exp(s - m_next)
    if apply_mask:
      probs = jnp.where(mask, probs, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(probs, axis=1, keepdims=True)
    v = v_ref[...]
    pv = jax.lax.dot(probs.astype(v.dtype), v, precision=prec, preferred_element_type=jnp.float32)
    acc_sc[...] = alpha * acc_sc[...] + pv
    m_sc[...] = m_next

  _on_mask_flag(pair.masked, body)

  @pl.when(pair.last != 0)
  def _finish():
    l = l_sc[...]
    l_safe = jnp.where(l == 0.0, 1.0, l)  # only padded rows have l == 0
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l_safe)


# ----------------------------------------------------------------------------- backward


def _recompute_probs(q, k, lse, st, en, k_tile, scale, block_k, apply_mask):
  """(bq, bk) float32 softmax probabilities of one tile from the saved log-sum-exp."""
  s = jax.lax.dot_general(q, k, NT_DIMS, precision=_precision(q.dtype), preferred_element_type=jnp.float32) * scale
  probs = jnp.exp(s - lse)
  if apply_mask:
    probs = jnp.where(_tile_mask(k_tile, st, en, block_k), probs, 0.0)
  return probs


def _dq_kernel(
  pairs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, st_ref, en_ref, dq_ref, dq_sc, *, scale, block_k
):
  p = pl.program_id(2)
  pair = _Pair(pairs_ref[p])

  @pl.when(pair.first != 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def body(apply_mask):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    prec = _precision(q.dtype)
    probs = _recompute_probs(q, k, lse_ref[...], st_ref[...], en_ref[...], pair.k_tile, scale, block_k, apply_mask)
    dp = jax.lax.dot_general(do, v, NT_DIMS, precision=prec, preferred_element_type=jnp.float32)
    ds = probs * (dp - delta_ref[...])
    dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k, precision=prec, preferred_element_type=jnp.float32)

  _on_mask_flag(pair.masked, body)

  @pl.when(pair.last != 0)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  pairs_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  st_ref,
  en_ref,
  dk_ref,
  dv_ref,
  dk_sc,
  dv_sc,
  *,
  scale,
  block_k,
):
  p = pl.program_id(2)
  pair = _Pair(pairs_ref[p])

  @pl.when(pair.first != 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def body(apply_mask):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    prec = _precision(q.dtype)
    probs = _recompute_probs(q, k, lse_ref[...], st_ref[...], en_ref[...], pair.k_tile, scale, block_k, apply_mask)
    dv_sc[...] += jax.lax.dot(probs.T.astype(do.dtype), do, precision=prec, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, NT_DIMS, precision=prec, preferred_element_type=jnp.float32)
    ds = probs * (dp - delta_ref[...])
    dk_sc[...] += jax.lax.dot(ds.T.astype(q.dtype), q, precision=prec, preferred_element_type=jnp.float32)

  _on_mask_flag(pair.masked, body)

  @pl.when(pair.last != 0)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls


# One int32 per touched pair, prefetched to SMEM (5x smaller than five separate lists):
# bits 0-11 query tile, 12-23 key tile, 24 first pair of its output tile, 25 last, 26 masked.
_TILE_BITS = 12
_TILE_MASK = (1 << _TILE_BITS) - 1


class _Pair:
  """Fields of one packed pair word (a traced int32 scalar)."""

  def __init__(self, word):
    self.q_tile = word & _TILE_MASK
    self.k_tile = (word >> _TILE_BITS) & _TILE_MASK
    self.first = (word >> 24) & 1
    self.last = (word >> 25) & 1
    self.masked = (word >> 26) & 1


def _pair_prefetch(pairs):
  if max(pairs["q"].max(), pairs["k"].max()) > _TILE_MASK:
    raise ValueError(f"more than {_TILE_MASK + 1} tiles per sequence; use larger blocks")
  word = (
    pairs["q"] | (pairs["k"] << _TILE_BITS) | (pairs["first"] << 24) | (pairs["last"] << 25) | (pairs["masked"] << 26)
  )
  return (jnp.asarray(word.astype(np.int32)),)


def _specs(block_q, block_k, head_dim):
  """BlockSpecs of the (B, H, L_pad, .) operands, indexed through the prefetched pair lists."""

  def q_map(b, h, p, pairs_ref):
    return (b, h, _Pair(pairs_ref[p]).q_tile, 0)

  def k_map(b, h, p, pairs_ref):
    return (b, h, _Pair(pairs_ref[p]).k_tile, 0)

  def row_map(b, h, p, pairs_ref):  # (L_pad, 1) per-row key ranges
    return (_Pair(pairs_ref[p]).q_tile, 0)

  sq = pl.BlockSpec((None, None, block_q, head_dim), q_map)
  sk = pl.BlockSpec((None, None, block_k, head_dim), k_map)
  sq_stat = pl.BlockSpec((None, None, block_q, 1), q_map)
  srow = pl.BlockSpec((block_q, 1), row_map)
  return sq, sk, sq_stat, srow


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _row_ranges(sched, patch_nums, pattern):
  """(L_pad, 1) int32 starts and ends; padded rows get the empty range [0, 0)."""
  starts, ends = patterns.key_ranges(patch_nums, pattern)
  pad = sched.num_q_tiles * sched.block_q - sched.length
  pad_rows = lambda a: jnp.asarray(np.pad(a, (0, pad))[:, None].astype(np.int32))
  return pad_rows(starts), pad_rows(ends)


def _kernel_name(kind: str, q: jax.Array, sched) -> str:
  """The pallas_call's name, carrying the shapes, so that a Mosaic error says which launch failed."""
  b, h, lp, d = q.shape
  return f"scale_attention_{kind}_b{b}_h{h}_l{lp}_d{d}_{q.dtype.name}_bq{sched.block_q}_bk{sched.block_k}"


def _fwd_call(q, k, v, st, en, sched, scale, interpret):
  b, h, lp, d = q.shape
  pairs = sched.pairs_by_row()
  sq, sk, sq_stat, srow = _specs(sched.block_q, sched.block_k, d)
  kernel = functools.partial(_fwd_kernel, scale=scale, block_k=sched.block_k)
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, h, len(pairs["q"])),
      in_specs=[sq, sk, sk, srow, srow],
      out_specs=[sq, sq_stat],
      scratch_shapes=[
        pltpu.VMEM((sched.block_q, 1), jnp.float32),
        pltpu.VMEM((sched.block_q, 1), jnp.float32),
        pltpu.VMEM((sched.block_q, d), jnp.float32),
      ],
    ),
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lp, 1), jnp.float32)],
    compiler_params=_compiler_params(),
    interpret=interpret,
    name=_kernel_name("fwd", q, sched),
  )(*_pair_prefetch(pairs), q, k, v, st, en)


def _bwd_call(q, k, v, do, lse, delta, st, en, sched, scale, interpret):
  b, h, lp, d = q.shape
  sq, sk, sq_stat, srow = _specs(sched.block_q, sched.block_k, d)
  in_specs = [sq, sk, sk, sq, sq_stat, sq_stat, srow, srow]
  operands = (q, k, v, do, lse, delta, st, en)

  rows = sched.pairs_by_row()
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, scale=scale, block_k=sched.block_k),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, h, len(rows["q"])),
      in_specs=in_specs,
      out_specs=sq,
      scratch_shapes=[pltpu.VMEM((sched.block_q, d), jnp.float32)],
    ),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_compiler_params(),
    interpret=interpret,
    name=_kernel_name("dq", q, sched),
  )(*_pair_prefetch(rows), *operands)

  cols = sched.pairs_by_col()
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, scale=scale, block_k=sched.block_k),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, h, len(cols["q"])),
      in_specs=in_specs,
      out_specs=[sk, sk],
      scratch_shapes=[pltpu.VMEM((sched.block_k, d), jnp.float32), pltpu.VMEM((sched.block_k, d), jnp.float32)],
    ),
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_compiler_params(),
    interpret=interpret,
    name=_kernel_name("dkv", q, sched),
  )(*_pair_prefetch(cols), *operands)
  return dq, dk, dv


def _to_kernel_layout(x, padded_length):
  """(B, L, H, D) -> (B, H, L_pad, D), zero rows appended."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, padded_length - x.shape[2]), (0, 0)))


def _from_kernel_layout(x, length):
  return jnp.swapaxes(x[:, :, :length], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _attention(q, k, v, patch_nums, pattern, scale, block_q, block_k, interpret):
  out, _ = _attention_fwd(q, k, v, patch_nums, pattern, scale, block_q, block_k, interpret)
  return out


def _setup(patch_nums, pattern, block_q, block_k):
  sched = tiling.tile_schedule(patch_nums, pattern, block_q, block_k)
  lp = max(sched.num_q_tiles * block_q, sched.num_k_tiles * block_k)
  return sched, lp


def _attention_fwd(q, k, v, patch_nums, pattern, scale, block_q, block_k, interpret):
  sched, lp = _setup(patch_nums, pattern, block_q, block_k)
  st, en = _row_ranges(sched, patch_nums, pattern)
  qp, kp, vp = (_to_kernel_layout(x, lp) for x in (q, k, v))
  out, lse = _fwd_call(qp, kp, vp, st, en, sched, scale, interpret)
  return _from_kernel_layout(out, sched.length), (qp, kp, vp, out, lse)


def _attention_bwd(patch_nums, pattern, scale, block_q, block_k, interpret, res, g):
  qp, kp, vp, out, lse = res
  sched, lp = _setup(patch_nums, pattern, block_q, block_k)
  st, en = _row_ranges(sched, patch_nums, pattern)
  do = _to_kernel_layout(g.astype(qp.dtype), lp)
  # delta_r = sum_d o_rd * do_rd, the softmax-backward correction (one fused XLA reduction).
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = _bwd_call(qp, kp, vp, do, lse, delta, st, en, sched, scale, interpret)
  length = sched.length
  return tuple(_from_kernel_layout(x, length) for x in (dq, dk, dv))


_attention.defvjp(_attention_fwd, _attention_bwd)


def check_blocks(block_q: int, block_k: int, interpret: bool) -> None:
  if block_q % 8 or block_k % 8 or block_q <= 0 or block_k <= 0:
    raise ValueError(f"block sizes must be positive multiples of 8, got ({block_q}, {block_k})")
  if not interpret and block_k % 128:
    raise ValueError(f"on TPU block_k must be a multiple of 128 (lane width), got {block_k}")


def scale_attention_pallas(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  patch_nums: Sequence[int],
  pattern: str,
  *,
  scale: float,
  block_q: int = DEFAULT_BLOCK_Q,
  block_k: int = DEFAULT_BLOCK_K,
  interpret: bool = False,
) -> jax.Array:
  """Block-sparse attention through the Pallas TPU kernels (interpret=True runs them on CPU).

  Args:
    q, k, v: (B, L, H, D), already checked by the caller.
  Returns:
    (B, L, H, D) in q's dtype.
  """
  check_blocks(block_q, block_k, interpret)
  pns = patterns.check_patch_nums(patch_nums)
  return _attention(q, k, v, pns, pattern, float(scale), int(block_q), int(block_k), bool(interpret))
