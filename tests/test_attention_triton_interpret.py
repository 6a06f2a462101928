"""The CUDA kernels' logic on CPU: Triton's interpreter (TRITON_INTERPRET=1) runs them on torch CPU
tensors, launched exactly as `triton_gpu` launches them through jax-triton (same schedule, same
operands), against the float64 oracle of tests/attention_oracle.py.

This checks tiling, masking, ragged tiles and the LSE / delta plumbing; it cannot check Hopper code
generation or speed, which `bench/gpu_check_attention.py` and `bench/attention.py` do on a GPU.
Skipped where triton is not installed.
"""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest

# Triton reads the flag when triton.language is first imported (its own helpers are @jit too),
# so it must be set before the import; no CPU test uses compiled Triton.
_TRITON_WAS_IMPORTED = "triton" in sys.modules
os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if _TRITON_WAS_IMPORTED and not triton.knobs.runtime.interpret:
  pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

from attention_oracle import attention_f64, scale_mask  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from pallas_kernels import patterns, tiling, triton_gpu  # noqa: E402


@pytest.fixture(scope="module")
def kern():
  """A private copy of _triton_kernels, its @jit functions made for the interpreter."""
  # Triton 3.6's interpreter turns 1-element scalars into Python ints with int(array), which
  # NumPy 2.4 refuses for 1-d arrays; `range(lo, hi)` over loaded scalars needs it.
  patch_tensor = interpreter._patch_lang_tensor  # pylint: disable=protected-access

  def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

  interpreter._patch_lang_tensor = patched  # pylint: disable=protected-access
  path = os.path.join(os.path.dirname(triton_gpu.__file__), "_triton_kernels.py")
  spec = importlib.util.spec_from_file_location("_triton_kernels_interpreted", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  yield module
  interpreter._patch_lang_tensor = patch_tensor  # pylint: disable=protected-access


def _operands(pn, pattern, block, other_block, side, cut):
  schedule = triton_gpu._schedule  # pylint: disable=protected-access
  _, packed, lo, hi = schedule(pn, pattern, block, other_block, side, cut)
  return [torch.from_numpy(np.ascontiguousarray(x)) for x in (packed, lo, hi)], packed.shape[0]


def run_kernels(kern, q, k, v, g, pn, pattern, blocks, cut, group=1):
  """Forward, dK/dV and dQ, every output NaN-filled first. q, k, v, g: (B, L, H, D) float32."""
  b, length, h, d = q.shape
  bm, bn = blocks
  scale = d**-0.5
  consts = dict(H=h, D=d, QK_SCALE=scale * math.log2(math.e), PRECISION="ieee")
  dummy = torch.zeros(1)
  nan = lambda *shape: torch.full(shape, float("nan"))

  ops, n = _operands(pn, pattern, bm, bn, "query", cut)
  out, lse = nan(*q.shape), nan(b, h, length)
  groups = -(-(b * h) // group)
  kern.attn_fwd[(groups * group * n,)](
    q,
    k,
    v,
    *ops,
    length,
    n,
    b * h,
    dummy,
    dummy,
    out,
    lse,
    BLOCK_M=bm,
    BLOCK_N=bn,
    FAST_EXP2=False,
    GROUP=group,
    **consts,
  )
  # (FAST_EXP2 is inline PTX, which the interpreter cannot run; the GPU check covers it.)
  delta = (out * g).sum(-1).transpose(1, 2).contiguous()

  ops, n = _operands(pn, pattern, bn, bm, "key", cut)
  dk, dv = nan(*k.shape), nan(*v.shape)
  kern.attn_bwd_dkv[(n, b * h)](
    q, k, v, g, lse, delta, *ops, length, dummy, dummy, dk, dv, BLOCK_M=bm, BLOCK_N=bn, SM_SCALE=scale, **consts
  )
  ops, n = _operands(pn, pattern, bm, bn, "query", cut)
  dq = nan(*q.shape)
  kern.attn_bwd_dq[(n, b * h)](
    q, k, v, g, lse, delta, *ops, length, dummy, dq, BLOCK_M=bm, BLOCK_N=bn, SM_SCALE=scale, **consts
  )
  return out, dq, dk, dv


def _check(kern, pn, pattern, blocks, cut, seed, batch=1, heads=2, head_dim=16, q_gain=1.0, group=1):
  length = sum(p * p for p in pn)
  rng = np.random.default_rng(seed)
  q, k, v, g = (rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32) for _ in range(4))
  q *= q_gain
  got = run_kernels(kern, *(torch.from_numpy(x) for x in (q, k, v, g)), pn, pattern, blocks, cut, group)
  ref_out, ref_grads = attention_f64(q, k, v, pn, pattern, d_out=g)
  for name, x, r in zip(("out", "dq", "dk", "dv"), got, (ref_out, *ref_grads)):
    x = x.numpy()
    assert np.isfinite(x).all(), f"{name}: unwritten (NaN) elements"
    err = np.abs(x - r).max() / np.abs(r).max()
    assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
@pytest.mark.parametrize("cut", ["scale", "global"])
def test_kernels_match_reference_on_a_ragged_layout(kern, pattern, cut):
  # L = 55 = 1 + 4 + 9 + 16 + 25: no scale edge on a tile edge, last tiles ragged.
  _check(kern, (1, 2, 3, 4, 5), pattern, (16, 16), cut, seed=0)


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_kernels_match_reference_with_unequal_tiles(kern, pattern):
  # 32 own rows x 16 other: packing of short scales and scales longer than a tile.
  _check(kern, (1, 2, 3, 4, 6, 7), pattern, (32, 16), None, seed=1, batch=2, heads=1)


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_kernels_match_reference_when_row_maxima_jump(kern, pattern):
  # Large logits (q x 6): running maxima move by tens (log2 units) between key tiles.
  _check(kern, (1, 2, 3, 4, 5, 8), pattern, (16, 16), None, seed=5, q_gain=6.0)


@pytest.mark.parametrize("group", [2, 4])
def test_forward_launch_groups_cover_every_batch_and_head(kern, group):
  # 3 (batch, head) pairs: with groups of 2 or 4 the last group is partly empty.
  _check(kern, (1, 2, 3, 4, 5), "block_diagonal", (16, 16), None, seed=7, batch=1, heads=3, group=group)


def test_kernels_match_reference_on_random_layouts(kern):
  rng = np.random.default_rng(3)
  for i in range(4):
    pn = tuple(int(p) for p in np.sort(rng.integers(1, 9, size=rng.integers(1, 5))))
    blocks = [(16, 16), (32, 16), (16, 32)][i % 3]
    _check(kern, pn, patterns.PATTERNS[i % 2], blocks, None, seed=10 + i)


def test_row_tiles_cover_exactly_the_pattern():
  """Every allowed (query, key) pair is visited exactly once; full tiles hold only allowed pairs."""
  for pn in ((1, 2, 3, 4, 5), (1, 2, 3, 4, 6, 9, 13)):
    for pattern in patterns.PATTERNS:
      allowed = scale_mask(pn, pattern)
      for side, cut in (("query", "scale"), ("query", "global"), ("key", "scale"), ("key", "global")):
        t = tiling.row_tiles(pn, pattern, 32, 16, side, cut)
        seen = np.zeros_like(allowed, dtype=np.int32)
        rows_seen = np.zeros(len(allowed), np.int32)
        for i in range(t.num_tiles):
          rows = np.arange(t.own_lo[i], t.own_hi[i])
          rows_seen[rows] += 1
          for j in range(t.num_other[i]):
            cols = np.arange(t.other_lo[i] + 16 * j, min(t.other_lo[i] + 16 * (j + 1), len(allowed)))
            block = allowed[np.ix_(rows, cols)] if side == "query" else allowed[np.ix_(cols, rows)].T
            if t.full_lo[i] <= j < t.full_hi[i]:
              assert block.all() and len(cols) == 16, (pattern, side, cut, i, j)
            if side == "query":
              seen[np.ix_(rows, cols)] += block
            else:
              seen[np.ix_(cols, rows)] += block.T
        assert (rows_seen == 1).all()
        np.testing.assert_array_equal(seen, allowed.astype(np.int32))
