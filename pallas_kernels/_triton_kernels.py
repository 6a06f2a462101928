"""Triton kernels of block-sparse scale attention (imported only when the CUDA path runs).

Tensors stay in the (B, L, H, D) layout of the caller: row r of head h of batch b starts at
((b * L + r) * H + h) * D. Softmax statistics (LSE, in base 2, and delta) are (B, H, L) float32.

Each program owns one output tile and walks the tiles of the other operand that its pattern
touches, read from per-tile [lo, hi) ranges (`tiling.TileSchedule`), in three runs: partial tiles
before the full ones (masked), the full ones (no mask), partial tiles after them (masked). The
mask is `starts[r] <= c < ends[r]`, which also hides columns past L; rows past L load as zeros.

The *_INIT pointers are never read: the GPU check passes NaN-filled buffers there, aliased to the
outputs, so that an element a kernel fails to write stays NaN; normal calls pass 1-element dummies.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, st, en, start_n, L,
              QK_SCALE: tl.constexpr, HD: tl.constexpr, D: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
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
    allowed = (offs_n[None, :] >= st[:, None]) & (offs_n[None, :] < en[:, None])
    s = tl.where(allowed, s, float("-inf"))
  # Scale after the row max (one multiply per row), then one FMA + exp2 per element.
  # m_i starts finite (-1e30), so a fully masked row gives exp2(-inf) = 0, never NaN.
  m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
  p = tl.math.exp2(s * QK_SCALE - m_new[:, None])
  alpha = tl.math.exp2(m_i - m_new)
  l_i = l_i * alpha + tl.sum(p, 1)
  if MASKED:
    v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
  else:
    v = tl.load(v_ptrs)
  acc = acc * alpha[:, None]
  acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
  return acc, l_i, m_new


@triton.jit
def attn_fwd(Q, K, V, ROW_LO, ROW_HI, FULL_LO, FULL_HI, STARTS, ENDS, L,
             O_INIT, LSE_INIT, O, LSE,
             H: tl.constexpr, D: tl.constexpr, QK_SCALE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1)
  b = pid_bh // H
  h = pid_bh % H
  HD: tl.constexpr = H * D
  base = b.to(tl.int64) * L * HD + h * D
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D)
  row_ok = offs_m < L
  q = tl.load(Q + base + offs_m[:, None] * HD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
  st = tl.load(STARTS + offs_m, mask=row_ok, other=0)
  en = tl.load(ENDS + offs_m, mask=row_ok, other=0)
  lo = tl.load(ROW_LO + pid_m)
  hi = tl.load(ROW_HI + pid_m)
  full_lo = tl.load(FULL_LO + pid_m)
  full_hi = tl.load(FULL_HI + pid_m)

  m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
  l_i = tl.zeros((BLOCK_M,), tl.float32)
  acc = tl.zeros((BLOCK_M, D), tl.float32)
  k_base = K + base
  v_base = V + base
  for j in range(lo, full_lo):
    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, st, en, j * BLOCK_N, L,
                              QK_SCALE, HD, D, BLOCK_N, True, PRECISION)
  for j in range(full_lo, full_hi):
    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, st, en, j * BLOCK_N, L,
                              QK_SCALE, HD, D, BLOCK_N, False, PRECISION)
  for j in range(full_hi, hi):
    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, st, en, j * BLOCK_N, L,
                              QK_SCALE, HD, D, BLOCK_N, True, PRECISION)

  l_safe = tl.where(l_i == 0.0, 1.0, l_i)
  out = acc / l_safe[:, None]
  tl.store(O + base + offs_m[:, None] * HD + offs_d[None, :], out.to(O.dtype.element_ty),
           mask=row_ok[:, None])
  lse_base = pid_bh.to(tl.int64) * L
  tl.store(LSE + lse_base + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _dkv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, ENDS, start_m, L,
              QK_SCALE: tl.constexpr, HD: tl.constexpr, D: tl.constexpr, offs_n,
              BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
  offs_m = start_m + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D)
  row_ok = offs_m < L
  qt = tl.load(q_base + offs_m[None, :] * HD + offs_d[:, None], mask=row_ok[None, :], other=0.0)
  lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
  # s^T (BLOCK_N, BLOCK_M): keys on rows so that dK, dV accumulate without transposes of them.
  st_ = tl.dot(k, qt, input_precision=PRECISION) * QK_SCALE
  pt = tl.math.exp2(st_ - lse[None, :])
  if MASKED:
    starts = tl.load(STARTS + offs_m, mask=row_ok, other=0)
    ends = tl.load(ENDS + offs_m, mask=row_ok, other=0)
    allowed = (offs_n[:, None] >= starts[None, :]) & (offs_n[:, None] < ends[None, :])
    pt = tl.where(allowed, pt, 0.0)
  do = tl.load(do_base + offs_m[:, None] * HD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
  dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
  delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
  dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
  dst = pt * (dpt - delta[None, :])
  dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
  return dk, dv


@triton.jit
def attn_bwd_dkv(Q, K, V, DO, LSE, DELTA, COL_LO, COL_HI, FULL_LO, FULL_HI, STARTS, ENDS, L,
                 DK_INIT, DV_INIT, DK, DV,
                 H: tl.constexpr, D: tl.constexpr, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
  pid_n = tl.program_id(0)
  pid_bh = tl.program_id(1)
  b = pid_bh // H
  h = pid_bh % H
  HD: tl.constexpr = H * D
  base = b.to(tl.int64) * L * HD + h * D
  stat_base = pid_bh.to(tl.int64) * L
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, D)
  col_ok = offs_n < L
  kv_offs = base + offs_n[:, None] * HD + offs_d[None, :]
  k = tl.load(K + kv_offs, mask=col_ok[:, None], other=0.0)
  v = tl.load(V + kv_offs, mask=col_ok[:, None], other=0.0)
  lo = tl.load(COL_LO + pid_n)
  hi = tl.load(COL_HI + pid_n)
  full_lo = tl.load(FULL_LO + pid_n)
  full_hi = tl.load(FULL_HI + pid_n)
  dk = tl.zeros((BLOCK_N, D), tl.float32)
  dv = tl.zeros((BLOCK_N, D), tl.float32)
  q_base = Q + base
  do_base = DO + base
  lse_base = LSE + stat_base
  delta_base = DELTA + stat_base
  for i in range(lo, full_lo):
    dk, dv = _dkv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, ENDS,
                       i * BLOCK_M, L, QK_SCALE, HD, D, offs_n, BLOCK_M, True, PRECISION)
  for i in range(full_lo, full_hi):
    dk, dv = _dkv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, ENDS,
                       i * BLOCK_M, L, QK_SCALE, HD, D, offs_n, BLOCK_M, False, PRECISION)
  for i in range(full_hi, hi):
    dk, dv = _dkv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, STARTS, ENDS,
                       i * BLOCK_M, L, QK_SCALE, HD, D, offs_n, BLOCK_M, True, PRECISION)
  tl.store(DK + kv_offs, (dk * SM_SCALE).to(DK.dtype.element_ty), mask=col_ok[:, None])
  tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, st, en, k_base, v_base, start_n, L,
             QK_SCALE: tl.constexpr, HD: tl.constexpr, D: tl.constexpr,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
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
    allowed = (offs_n[None, :] >= st[:, None]) & (offs_n[None, :] < en[:, None])
    p = tl.where(allowed, p, 0.0)
  dp = tl.dot(do, vt, input_precision=PRECISION)
  ds = p * (dp - delta[:, None])
  dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
  return dq


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, ROW_LO, ROW_HI, FULL_LO, FULL_HI, STARTS, ENDS, L,
                DQ_INIT, DQ,
                H: tl.constexpr, D: tl.constexpr, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1)
  b = pid_bh // H
  h = pid_bh % H
  HD: tl.constexpr = H * D
  base = b.to(tl.int64) * L * HD + h * D
  stat_base = pid_bh.to(tl.int64) * L
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D)
  row_ok = offs_m < L
  row_offs = base + offs_m[:, None] * HD + offs_d[None, :]
  q = tl.load(Q + row_offs, mask=row_ok[:, None], other=0.0)
  do = tl.load(DO + row_offs, mask=row_ok[:, None], other=0.0)
  lse = tl.load(LSE + stat_base + offs_m, mask=row_ok, other=0.0)
  delta = tl.load(DELTA + stat_base + offs_m, mask=row_ok, other=0.0)
  st = tl.load(STARTS + offs_m, mask=row_ok, other=0)
  en = tl.load(ENDS + offs_m, mask=row_ok, other=0)
  lo = tl.load(ROW_LO + pid_m)
  hi = tl.load(ROW_HI + pid_m)
  full_lo = tl.load(FULL_LO + pid_m)
  full_hi = tl.load(FULL_HI + pid_m)
  dq = tl.zeros((BLOCK_M, D), tl.float32)
  k_base = K + base
  v_base = V + base
  for j in range(lo, full_lo):
    dq = _dq_tile(dq, q, do, lse, delta, st, en, k_base, v_base, j * BLOCK_N, L,
                  QK_SCALE, HD, D, BLOCK_N, True, PRECISION)
  for j in range(full_lo, full_hi):
    dq = _dq_tile(dq, q, do, lse, delta, st, en, k_base, v_base, j * BLOCK_N, L,
                  QK_SCALE, HD, D, BLOCK_N, False, PRECISION)
  for j in range(full_hi, hi):
    dq = _dq_tile(dq, q, do, lse, delta, st, en, k_base, v_base, j * BLOCK_N, L,
                  QK_SCALE, HD, D, BLOCK_N, True, PRECISION)
  tl.store(DQ + row_offs, (dq * SM_SCALE).to(DQ.dtype.element_ty), mask=row_ok[:, None])
