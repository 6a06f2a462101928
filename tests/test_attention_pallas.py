"""Pallas TPU scale-attention kernels, run in interpret mode on CPU, against float64 NumPy
(tests/attention_oracle.py: masks built from the patterns' definition, not from pallas_kernels).

Interpret mode fills every output and scratch buffer with NaN before the kernel runs, so an
element the kernels fail to write (a skipped tile, a missed ragged row) shows up as NaN here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_oracle import attention_f64
from jax import export
from jax.experimental import pallas as pl

from pallas_kernels import api, patterns

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 680 tokens
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 2240 tokens
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}


def _rel(x, ref):
  """max |x - ref| / max |ref|, NaN-propagating."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


def _inputs(seed, shape, dtype):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4)]


def _check(pn, pattern, *, batch=1, heads=1, head_dim=64, dtype=jnp.float32, blocks=(128, 128), grads=True, seed=0):
  length = sum(p * p for p in pn)
  q, k, v, g = _inputs(seed, (batch, length, heads, head_dim), dtype)
  f = functools.partial(
    api.scale_attention, patch_nums=pn, pattern=pattern, implementation="pallas_interpret", block_sizes=blocks
  )
  tol = TOL[dtype]
  if not grads:
    out = f(q, k, v)
    ref = attention_f64(q, k, v, pn, pattern)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, ref) < tol
    return
  out, vjp = jax.vjp(f, q, k, v)
  got = vjp(g)
  ref, ref_grads = attention_f64(q, k, v, pn, pattern, d_out=g)
  assert out.dtype == dtype
  errors = [_rel(out, ref)] + [_rel(x, r) for x, r in zip(got, ref_grads)]
  assert all(x.dtype == dtype for x in got)
  # Each error compared on its own: Python's max() would skip a NaN after the first element.
  assert all(e < tol for e in errors), dict(zip(("out", "dq", "dk", "dv"), errors))


def test_interpret_mode_poisons_unwritten_output():
  """The premise of the checks below: an output element nobody writes reads as NaN."""

  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  out = pl.pallas_call(
    kernel,
    grid=(2,),
    in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
    out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
    out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
    interpret=True,
  )(jnp.ones((16, 128), jnp.float32))
  assert np.isfinite(out[:8]).all() and np.isnan(out[8:]).all()


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_256px_layout_forward_and_grads_float32(pattern):
  _check(PN_256, pattern, heads=2)


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_512px_layout_forward_float32(pattern):
  _check(PN_512, pattern, grads=False, blocks=(256, 256))


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_512px_layout_grads_float32(pattern):
  _check(PN_512, pattern, blocks=(256, 256))


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_256px_layout_bfloat16(pattern):
  _check(PN_256, pattern, dtype=jnp.bfloat16, batch=2, seed=1)


def test_float16_and_head_dim_128():
  _check((1, 2, 3, 4, 5, 6), "block_causal", dtype=jnp.float16, head_dim=128, blocks=(32, 32))
  _check((1, 2, 3, 4, 5, 6), "block_diagonal", head_dim=128, blocks=(32, 32), grads=False)


@pytest.mark.parametrize("seed", range(6))
def test_random_small_layouts(seed):
  """Seeded sweep: random scale sizes, tile shapes, pattern, batch and heads."""
  rng = np.random.default_rng(100 + seed)
  pn = tuple(int(p) for p in np.sort(rng.integers(1, 9, size=rng.integers(1, 6))))
  blocks = tuple(int(b) for b in rng.choice([8, 16, 32], size=2))
  pattern = patterns.PATTERNS[seed % 2]
  _check(pn, pattern, batch=int(rng.integers(1, 3)), heads=int(rng.integers(1, 3)), blocks=blocks, seed=seed)


@pytest.mark.parametrize("dtype,head_dim", [(jnp.bfloat16, 64), (jnp.float32, 128)])
def test_lowers_for_tpu(dtype, head_dim):
  """Forward and backward lower to three Mosaic custom calls on a CPU-only machine."""
  x = jax.ShapeDtypeStruct((2, 680, 4, head_dim), dtype)

  def loss(q, k, v):
    out = api.scale_attention(q, k, v, PN_256, "block_causal", implementation="pallas_tpu")
    return jnp.sum(out.astype(jnp.float32) ** 2)

  exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(x, x, x)
  text = exported.mlir_module()
  assert text.count("tpu_custom_call") == 3
  for name in ("scale_attention_fwd", "scale_attention_dq", "scale_attention_dkv"):
    assert name in text


@pytest.mark.parametrize(
  "shape_q,shape_kv,pn,match",
  [
    ((1, 14, 2, 96), (1, 14, 2, 96), (1, 2, 3), "head dim"),
    ((1, 14, 2, 64), (1, 13, 2, 64), (1, 2, 3), "same sequence length"),
    ((1, 14, 2, 64), (1, 14, 2, 64), (1, 2, 4), "does not match patch_nums"),
    ((14, 2, 64), (14, 2, 64), (1, 2, 3), r"\(B, L, H, D\)"),
  ],
)
def test_bad_shapes_raise_clear_errors(shape_q, shape_kv, pn, match):
  q = jnp.zeros(shape_q, jnp.float32)
  kv = jnp.zeros(shape_kv, jnp.float32)
  with pytest.raises(ValueError, match=match):
    api.scale_attention(q, kv, kv, pn, "block_causal", implementation="pallas_interpret")


def test_unknown_pattern_and_bad_blocks_raise():
  q = jnp.zeros((1, 14, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match="unknown attention pattern"):
    api.scale_attention(q, q, q, (1, 2, 3), "causal", implementation="pallas_interpret")
  with pytest.raises(ValueError, match="multiple of 128"):
    api.scale_attention(q, q, q, (1, 2, 3), "block_causal", implementation="pallas_tpu", block_sizes=(128, 64))
