"""Triton kernels of block-sparse scale attention (imported only when the CUDA path runs).

Tensors stay in the (B, L, H, D) layout of the caller: row r of head h of batch b starts at
((b * L + r) * H + h) * D. Softmax statistics (LSE, in base 2, and delta) are (B, H, L) float32.

Each program owns one tile of rows of `tiling.RowTiles` (queries for the forward and dQ, keys
for dK/dV) and walks the tiles of the other side those rows meet. TILES holds one int32 row of 8
per program: own_lo, own_hi, other_lo, num_other, full_lo, full_hi (and two unused). Other-side
tile j starts at other_lo + j * block; tiles j in [full_lo, full_hi) run without a mask, the
others are masked per element with the own rows' ranges RANGE_LO[r] <= c < RANGE_HI[r], which
also hides columns past L. Own rows past own_hi load as zeros and are never stored.

The backward grids are (tiles, batch * heads) with the tile axis fastest, so the tiles of one
(batch, head) run together and its keys and values are read from L2 after the first tile; the
forward's 1-D grid does the same for groups of (batch, head) pairs (see attn_fwd).

The *_INIT pointers are never read: the GPU check passes NaN-filled buffers there, aliased to the
outputs, so that an element a kernel fails to write stays NaN; normal calls pass 1-element dummies.
"""

import triton
import triton.language as tl


@triton.jit
def _exp2(x, FAST: tl.constexpr):
  if FAST:
    # One MUFU.EX2 per element, denormal results flushed to zero (irrelevant to softmax
    # weights); tl.math.exp2's non-ftz ex2.approx.f32 is wrapped by ptxas in a compare and two
    # predicated multiplies on every score element (about 2% of the forward at 9451 on H100).
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
  else:
    return tl.math.exp2(x)


@triton.jit
def _tile_row(tile):
  """own_lo, own_hi, other_lo, num_other, full_lo, full_hi of one TILES row."""
  return (tl.load(tile), tl.load(tile + 1), tl.load(tile + 2), tl.load(tile + 3), tl.load(tile + 4), tl.load(tile + 5))


@triton.jit
def _head_base(pid_bh, L, H: tl.constexpr, D: tl.constexpr):
  """Offset of row 0 of (batch, head) pair pid_bh = b * H + h in a (B, L, H, D) tensor."""
  return (pid_bh // H).to(tl.int64) * L * (H * D) + (pid_bh % H) * D


@triton.jit
def _fwd_tile(
  acc,
  l_i,
  m_i,
  q,
  k_base,
  v_base,
  r_lo,
  r_hi,
  start_n,
  L,
  QK_SCALE: tl.constexpr,
  HD: tl.constexpr,
  D: tl.constexpr,
  BLOCK_N: tl.constexpr,
  MASKED: tl.constexpr,
  PRECISION: tl.constexpr,
  FAST_EXP2: tl.constexpr,
):
  offs_n = start_n + tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, D)
  kt_ptrs = k_base + offs_n[None, :] * HD + offs_d[:, None]
  v_ptrs = v_base + offs_n[:, None] * HD + offs_d[None, :]
  if MASKED:
    col_ok = offs_n < L
    kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
  else:
    kt = tl.load(kt_ptrs)
  s = tl.dot(q, kt, input_precision=PRECISION)
  if MASKED:
    allowed = (offs_n[None, :] >= r_lo[:, None]) & (offs_n[None, :] < r_hi[:, None])
    s = tl.where(allowed, s, float("-inf"))
  # Scale after the row max (one multiply per row), then one FMA + exp2 per element.
  # m_i starts finite (-1e30), so a fully masked row gives exp2(-inf) = 0, never NaN.
  m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
  p = _exp2(s * QK_SCALE - m_new[:, None], FAST_EXP2)
  alpha = tl.math.exp2(m_i - m_new)
  l_i = l_i * alpha + tl.sum(p, 1)
  if MASKED:  # noqa: SIM108 (a constexpr branch in a Triton kernel, like the loads above)
    v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
  else:
    v = tl.load(v_ptrs)
  acc = acc * alpha[:, None]
  acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
  return acc, l_i, m_new


@triton.jit
def attn_fwd(
  Q,
  K,
  V,
  TILES,
  RANGE_LO,
  RANGE_HI,
  L,
  NUM_TILES,
  BH,
  O_INIT,
  LSE_INIT,
  O,
  LSE,
  H: tl.constexpr,
  D: tl.constexpr,
  QK_SCALE: tl.constexpr,
  BLOCK_M: tl.constexpr,
  BLOCK_N: tl.constexpr,
  PRECISION: tl.constexpr,
  FAST_EXP2: tl.constexpr,
  GROUP: tl.constexpr,
):
  # 1-D grid in groups of GROUP (batch, head) pairs: within a group, tile-major (longest walk
  # first), then the pair. GROUP = 1 runs one pair's tiles together (its keys stay in L2); a
  # larger group starts the long tiles of GROUP pairs before any short one, which shortens the
  # tail of the launch while GROUP pairs' keys still fit in L2.
  pid = tl.program_id(0)
  per_group = NUM_TILES * GROUP
  pid_bh = (pid // per_group) * GROUP + pid % GROUP
  if pid_bh >= BH:
    return
  own_lo, own_hi, other_lo, num_other, full_lo, full_hi = _tile_row(TILES + ((pid % per_group) // GROUP) * 8)
  HD: tl.constexpr = H * D
  base = _head_base(pid_bh, L, H, D)
  offs_m = own_lo + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D)
  row_ok = offs_m < own_hi
  q = tl.load(Q + base + offs_m[:, None] * HD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
  r_lo = tl.load(RANGE_LO + offs_m, mask=row_ok, other=0)
  r_hi = tl.load(RANGE_HI + offs_m, mask=row_ok, other=0)

  m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
  l_i = tl.zeros((BLOCK_M,), tl.float32)
  acc = tl.zeros((BLOCK_M, D), tl.float32)
  k_base = K + base
  v_base = V + base
  for j in range(0, full_lo):
    acc, l_i, m_i = _fwd_tile(
      acc,
      l_i,
      m_i,
      q,
      k_base,
      v_base,
      r_lo,
      r_hi,
      other_lo + j * BLOCK_N,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_N,
      True,
      PRECISION,
      FAST_EXP2,
    )
  for j in range(full_lo, full_hi):
    acc, l_i, m_i = _fwd_tile(
      acc,
      l_i,
      m_i,
      q,
      k_base,
      v_base,
      r_lo,
      r_hi,
      other_lo + j * BLOCK_N,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_N,
      False,
      PRECISION,
      FAST_EXP2,
    )
  for j in range(full_hi, num_other):
    acc, l_i, m_i = _fwd_tile(
      acc,
      l_i,
      m_i,
      q,
      k_base,
      v_base,
      r_lo,
      r_hi,
      other_lo + j * BLOCK_N,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_N,
      True,
      PRECISION,
      FAST_EXP2,
    )

  l_safe = tl.where(l_i == 0.0, 1.0, l_i)
  out = acc / l_safe[:, None]
  tl.store(O + base + offs_m[:, None] * HD + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
  lse_base = pid_bh.to(tl.int64) * L
  tl.store(LSE + lse_base + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _dkv_tile(
  dk,
  dv,
  k,
  v,
  q_base,
  do_base,
  lse_base,
  delta_base,
  r_lo,
  r_hi,
  start_m,
  L,
  QK_SCALE: tl.constexpr,
  HD: tl.constexpr,
  D: tl.constexpr,
  BLOCK_M: tl.constexpr,
  MASKED: tl.constexpr,
  PRECISION: tl.constexpr,
):
  offs_m = start_m + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D)
  if MASKED:
    row_ok = offs_m < L
    qt = tl.load(q_base + offs_m[None, :] * HD + offs_d[:, None], mask=row_ok[None, :], other=0.0)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
  else:
    qt = tl.load(q_base + offs_m[None, :] * HD + offs_d[:, None])
    lse = tl.load(lse_base + offs_m)
  # s^T (BLOCK_N, BLOCK_M): keys on rows so that dK, dV accumulate without transposes of them.
  st_ = tl.dot(k, qt, input_precision=PRECISION) * QK_SCALE
  pt = tl.math.exp2(st_ - lse[None, :])
  if MASKED:
    # r_lo / r_hi: per key row, the queries that attend to it.
    allowed = (offs_m[None, :] >= r_lo[:, None]) & (offs_m[None, :] < r_hi[:, None])
    pt = tl.where(allowed, pt, 0.0)
    do = tl.load(do_base + offs_m[:, None] * HD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
  else:
    do = tl.load(do_base + offs_m[:, None] * HD + offs_d[None, :])
    delta = tl.load(delta_base + offs_m)
  dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
  dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
  dst = pt * (dpt - delta[None, :])
  dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
  return dk, dv


@triton.jit
def attn_bwd_dkv(
  Q,
  K,
  V,
  DO,
  LSE,
  DELTA,
  TILES,
  RANGE_LO,
  RANGE_HI,
  L,
  DK_INIT,
  DV_INIT,
  DK,
  DV,
  H: tl.constexpr,
  D: tl.constexpr,
  QK_SCALE: tl.constexpr,
  SM_SCALE: tl.constexpr,
  BLOCK_M: tl.constexpr,
  BLOCK_N: tl.constexpr,
  PRECISION: tl.constexpr,
):
  own_lo, own_hi, other_lo, num_other, full_lo, full_hi = _tile_row(TILES + tl.program_id(0) * 8)
  pid_bh = tl.program_id(1)
  HD: tl.constexpr = H * D
  base = _head_base(pid_bh, L, H, D)
  stat_base = pid_bh.to(tl.int64) * L
  offs_n = own_lo + tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, D)
  col_ok = offs_n < own_hi
  kv_offs = base + offs_n[:, None] * HD + offs_d[None, :]
  k = tl.load(K + kv_offs, mask=col_ok[:, None], other=0.0)
  v = tl.load(V + kv_offs, mask=col_ok[:, None], other=0.0)
  r_lo = tl.load(RANGE_LO + offs_n, mask=col_ok, other=0)
  r_hi = tl.load(RANGE_HI + offs_n, mask=col_ok, other=0)
  dk = tl.zeros((BLOCK_N, D), tl.float32)
  dv = tl.zeros((BLOCK_N, D), tl.float32)
  q_base = Q + base
  do_base = DO + base
  lse_base = LSE + stat_base
  delta_base = DELTA + stat_base
  for i in range(0, full_lo):
    dk, dv = _dkv_tile(
      dk,
      dv,
      k,
      v,
      q_base,
      do_base,
      lse_base,
      delta_base,
      r_lo,
      r_hi,
      other_lo + i * BLOCK_M,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_M,
      True,
      PRECISION,
    )
  for i in range(full_lo, full_hi):
    dk, dv = _dkv_tile(
      dk,
      dv,
      k,
      v,
      q_base,
      do_base,
      lse_base,
      delta_base,
      r_lo,
      r_hi,
      other_lo + i * BLOCK_M,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_M,
      False,
      PRECISION,
    )
  for i in range(full_hi, num_other):
    dk, dv = _dkv_tile(
      dk,
      dv,
      k,
      v,
      q_base,
      do_base,
      lse_base,
      delta_base,
      r_lo,
      r_hi,
      other_lo + i * BLOCK_M,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_M,
      True,
      PRECISION,
    )
  tl.store(DK + kv_offs, (dk * SM_SCALE).to(DK.dtype.element_ty), mask=col_ok[:, None])
  tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tile(
  dq,
  q,
  do,
  lse,
  delta,
  r_lo,
  r_hi,
  k_base,
  v_base,
  start_n,
  L,
  QK_SCALE: tl.constexpr,
  HD: tl.constexpr,
  D: tl.constexpr,
  BLOCK_N: tl.constexpr,
  MASKED: tl.constexpr,
  PRECISION: tl.constexpr,
):
  offs_n = start_n + tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, D)
  t_ptrs = offs_n[None, :] * HD + offs_d[:, None]
  if MASKED:
    col_ok = offs_n < L
    kt = tl.load(k_base + t_ptrs, mask=col_ok[None, :], other=0.0)
    vt = tl.load(v_base + t_ptrs, mask=col_ok[None, :], other=0.0)
  else:
    kt = tl.load(k_base + t_ptrs)
    vt = tl.load(v_base + t_ptrs)
  s = tl.dot(q, kt, input_precision=PRECISION) * QK_SCALE
  p = tl.math.exp2(s - lse[:, None])
  if MASKED:
    allowed = (offs_n[None, :] >= r_lo[:, None]) & (offs_n[None, :] < r_hi[:, None])
    p = tl.where(allowed, p, 0.0)
  dp = tl.dot(do, vt, input_precision=PRECISION)
  ds = p * (dp - delta[:, None])
  dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
  return dq


@triton.jit
def attn_bwd_dq(
  Q,
  K,
  V,
  DO,
  LSE,
  DELTA,
  TILES,
  RANGE_LO,
  RANGE_HI,
  L,
  DQ_INIT,
  DQ,
  H: tl.constexpr,
  D: tl.constexpr,
  QK_SCALE: tl.constexpr,
  SM_SCALE: tl.constexpr,
  BLOCK_M: tl.constexpr,
  BLOCK_N: tl.constexpr,
  PRECISION: tl.constexpr,
):
  own_lo, own_hi, other_lo, num_other, full_lo, full_hi = _tile_row(TILES + tl.program_id(0) * 8)
  pid_bh = tl.program_id(1)
  HD: tl.constexpr = H * D
  base = _head_base(pid_bh, L, H, D)
  stat_base = pid_bh.to(tl.int64) * L
  offs_m = own_lo + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D)
  row_ok = offs_m < own_hi
  row_offs = base + offs_m[:, None] * HD + offs_d[None, :]
  q = tl.load(Q + row_offs, mask=row_ok[:, None], other=0.0)
  do = tl.load(DO + row_offs, mask=row_ok[:, None], other=0.0)
  lse = tl.load(LSE + stat_base + offs_m, mask=row_ok, other=0.0)
  delta = tl.load(DELTA + stat_base + offs_m, mask=row_ok, other=0.0)
  r_lo = tl.load(RANGE_LO + offs_m, mask=row_ok, other=0)
  r_hi = tl.load(RANGE_HI + offs_m, mask=row_ok, other=0)
  dq = tl.zeros((BLOCK_M, D), tl.float32)
  k_base = K + base
  v_base = V + base
  for j in range(0, full_lo):
    dq = _dq_tile(
      dq,
      q,
      do,
      lse,
      delta,
      r_lo,
      r_hi,
      k_base,
      v_base,
      other_lo + j * BLOCK_N,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_N,
      True,
      PRECISION,
    )
  for j in range(full_lo, full_hi):
    dq = _dq_tile(
      dq,
      q,
      do,
      lse,
      delta,
      r_lo,
      r_hi,
      k_base,
      v_base,
      other_lo + j * BLOCK_N,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_N,
      False,
      PRECISION,
    )
  for j in range(full_hi, num_other):
    dq = _dq_tile(
      dq,
      q,
      do,
      lse,
      delta,
      r_lo,
      r_hi,
      k_base,
      v_base,
      other_lo + j * BLOCK_N,
      L,
      QK_SCALE,
      HD,
      D,
      BLOCK_N,
      True,
      PRECISION,
    )
  tl.store(DQ + row_offs, (dq * SM_SCALE).to(DQ.dtype.element_ty), mask=row_ok[:, None])
