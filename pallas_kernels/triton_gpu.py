"""CUDA path: the Triton kernels of `_triton_kernels` called through `jax_triton.triton_call`.

jax_triton and triton are imported on first use only, so CPU and TPU installs never need them.
Forward saves the base-2 log-sum-exp; backward runs one dK/dV kernel (a program per key tile,
walking the queries that attend to it) and one dQ kernel (a program per query tile), after an XLA
reduction for delta = rowsum(O * dO). The tiles are `tiling.RowTiles`: cut at scale starts where
that visits fewer elements than a global grid, so no kernel visits a tile its pattern leaves
empty.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import patterns, tiling


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Tile sizes (rows of the resident tile x rows of the streamed tile), warps and pipeline depth.

  `config_for_length` ships SHORT_CONFIG or LONG_CONFIG, chosen from timings on H100s
  (bench/attention.py, bench/NOTES_attention.md); the field defaults are the plain variant.
  """

  fwd_block_m: int = 64
  fwd_block_n: int = 64
  fwd_warps: int = 4
  fwd_stages: int = 3
  dkv_block_m: int = 64  # streamed query tiles
  dkv_block_n: int = 64  # resident key tile
  dkv_warps: int = 4
  dkv_stages: int = 3
  dq_block_m: int = 64  # resident query tile
  dq_block_n: int = 64  # streamed key tiles
  dq_warps: int = 4
  dq_stages: int = 3
  # Forward softmax exponent as ex2.approx.ftz.f32 rather than tl.math.exp2 (about 2% at 9451
  # block_diagonal on H100; see _triton_kernels._exp2). The backward keeps tl.math.exp2, which
  # timed no slower there.
  fwd_fast_exp2: bool = True
  # Forward launch order: (batch, head) pairs per group (see _triton_kernels.attn_fwd).
  fwd_group: int = 1
  # Checks only: outputs start as NaN (aliased buffers) so unwritten elements show.
  poison_outputs: bool = False


# Forward launched in groups of 16 (batch, head) pairs (H100: 9451 block_diagonal 1.944 vs 1.965 ms
# with 128x64 tiles; 2240 block_diagonal 0.171 vs 0.178 ms with 64x64; bench/NOTES_attention.md, v4).
SHORT_CONFIG = TritonConfig(fwd_group=16)
# L >= LONG_FROM: forward on 128-query tiles with 8 warps (H100, L = 9451: 2.01 / 4.38 ms against
# 2.17 / 4.68 for 64x64 at block_diagonal / block_causal). The backward keeps 64x64 tiles, the
# fastest of those timed at every length.
LONG_CONFIG = TritonConfig(fwd_block_m=128, fwd_block_n=64, fwd_warps=8, fwd_group=16)
LONG_FROM = 4096


def config_for_length(length: int) -> TritonConfig:
  return LONG_CONFIG if length >= LONG_FROM else SHORT_CONFIG


@functools.cache
def _modules():
  try:
    import jax_triton  # optional (CUDA only): imported when the kernels first run
  except ImportError as e:
    raise ImportError(
      "implementation='triton' needs the jax-triton package (pip install jax-triton) and a CUDA GPU"
    ) from e
  from pallas_kernels import _triton_kernels  # imports triton (optional), so only with jax_triton

  return jax_triton, _triton_kernels


def available() -> bool:
  """True if jax_triton imports and the default backend is a CUDA GPU."""
  try:
    _modules()
  except ImportError:
    return False
  return jax.default_backend() == "gpu"


@functools.lru_cache(maxsize=64)
def _schedule(patch_nums, pattern, block, other_block, side, cut=None):
  """The RowTiles of one kernel and its device-independent int32 operands.

  Returns (tiles, TILES (n, 8) int32, RANGE_LO (L,) int32, RANGE_HI (L,) int32).
  """
  t = tiling.row_tiles(patch_nums, pattern, block, other_block, side, cut)
  packed = np.zeros((t.num_tiles, 8), np.int32)  # the kernels read row i at TILES + 8 * i
  for i, col in enumerate((t.own_lo, t.own_hi, t.other_lo, t.num_other, t.full_lo, t.full_hi)):
    packed[:, i] = col
  lo, hi = tiling.other_ranges(patch_nums, pattern, side)
  return t, packed, lo, hi


def _precision(dtype) -> str:
  # float32 inputs: exact float32 products (tf32 would miss the 1e-4 tolerance).
  return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


def _initial_outputs(shapes, first_index, poison):
  """The *_INIT operands: NaN buffers aliased to the outputs when poisoning, else dummies.

  `first_index` counts array operands only (jax_triton aliases among those; scalars excluded).
  """
  if not poison:
    return [jnp.zeros((1,), s.dtype) for s in shapes], None
  inits = [jnp.full(s.shape, jnp.nan, s.dtype) for s in shapes]
  return inits, {first_index + i: i for i in range(len(shapes))}


def _fwd(q, k, v, patch_nums, pattern, scale, cfg):
  jt, kern = _modules()
  b, length, h, d = q.shape
  tiles, packed, lo, hi = _schedule(patch_nums, pattern, cfg.fwd_block_m, cfg.fwd_block_n, "query")
  a = lambda x: jnp.asarray(x, jnp.int32)
  shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length), jnp.float32)]
  inits, aliases = _initial_outputs(shapes, 6, cfg.poison_outputs)
  groups = -(-(b * h) // cfg.fwd_group)
  out, lse = jt.triton_call(
    q,
    k,
    v,
    a(packed),
    a(lo),
    a(hi),
    length,
    tiles.num_tiles,
    b * h,
    *inits,
    kernel=kern.attn_fwd,
    out_shape=shapes,
    input_output_aliases=aliases,
    grid=(groups * cfg.fwd_group * tiles.num_tiles,),
    num_warps=cfg.fwd_warps,
    num_stages=cfg.fwd_stages,
    H=h,
    D=d,
    QK_SCALE=float(scale * math.log2(math.e)),
    BLOCK_M=cfg.fwd_block_m,
    BLOCK_N=cfg.fwd_block_n,
    PRECISION=_precision(q.dtype),
    FAST_EXP2=cfg.fwd_fast_exp2,
    GROUP=cfg.fwd_group,
  )
  return out, lse


def _bwd(q, k, v, out, lse, do, patch_nums, pattern, scale, cfg):
  jt, kern = _modules()
  b, length, h, d = q.shape
  a = lambda x: jnp.asarray(x, jnp.int32)
  # delta[b, h, r] = sum_d O * dO: one fused XLA reduction, read by both kernels.
  delta = jnp.swapaxes(jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
  common = dict(
    H=h, D=d, QK_SCALE=float(scale * math.log2(math.e)), SM_SCALE=float(scale), PRECISION=_precision(q.dtype)
  )

  tiles, packed, lo, hi = _schedule(patch_nums, pattern, cfg.dkv_block_n, cfg.dkv_block_m, "key")
  shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  inits, aliases = _initial_outputs(shapes, 9, cfg.poison_outputs)
  dk, dv = jt.triton_call(
    q,
    k,
    v,
    do,
    lse,
    delta,
    a(packed),
    a(lo),
    a(hi),
    length,
    *inits,
    kernel=kern.attn_bwd_dkv,
    out_shape=shapes,
    input_output_aliases=aliases,
    grid=(tiles.num_tiles, b * h),
    num_warps=cfg.dkv_warps,
    num_stages=cfg.dkv_stages,
    BLOCK_M=cfg.dkv_block_m,
    BLOCK_N=cfg.dkv_block_n,
    **common,
  )

  tiles, packed, lo, hi = _schedule(patch_nums, pattern, cfg.dq_block_m, cfg.dq_block_n, "query")
  shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  inits, aliases = _initial_outputs(shapes, 9, cfg.poison_outputs)
  (dq,) = jt.triton_call(
    q,
    k,
    v,
    do,
    lse,
    delta,
    a(packed),
    a(lo),
    a(hi),
    length,
    *inits,
    kernel=kern.attn_bwd_dq,
    out_shape=shapes,
    input_output_aliases=aliases,
    grid=(tiles.num_tiles, b * h),
    num_warps=cfg.dq_warps,
    num_stages=cfg.dq_stages,
    BLOCK_M=cfg.dq_block_m,
    BLOCK_N=cfg.dq_block_n,
    **common,
  )
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, patch_nums, pattern, scale, cfg):
  return _fwd(q, k, v, patch_nums, pattern, scale, cfg)[0]


def _attention_fwd(q, k, v, patch_nums, pattern, scale, cfg):
  out, lse = _fwd(q, k, v, patch_nums, pattern, scale, cfg)
  return out, (q, k, v, out, lse)


def _attention_bwd(patch_nums, pattern, scale, cfg, res, g):
  q, k, v, out, lse = res
  return _bwd(q, k, v, out, lse, g.astype(q.dtype), patch_nums, pattern, scale, cfg)


_attention.defvjp(_attention_fwd, _attention_bwd)


def scale_attention_triton(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  patch_nums: Sequence[int],
  pattern: str,
  *,
  scale: float,
  config: TritonConfig | None = None,
) -> jax.Array:
  """Block-sparse attention through the Triton kernels (CUDA only).

  Args:
    q, k, v: (B, L, H, D), already checked by the caller.
  Returns:
    (B, L, H, D) in q's dtype.
  """
  _modules()
  if config is None:
    config = config_for_length(q.shape[1])
  return _attention(q, k, v, patterns.check_patch_nums(patch_nums), pattern, float(scale), config)
