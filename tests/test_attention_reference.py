"""The XLA reference and the tile schedule of scale attention, against float64 NumPy.

The float64 oracle and the masks come from tests/attention_oracle.py, built from the patterns'
definition rather than from pallas_kernels.patterns, so a wrong mask there cannot hide.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_oracle import attention_f64, scale_mask, token_scales

from pallas_kernels import api, patterns, reference, tiling

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 680 tokens, official 256 px layout
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 2240 tokens
PN_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)  # 9451 tokens


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


def test_the_oracle_masks_of_a_two_scale_layout_written_out():
  # patch_nums (1, 2): token 0 is scale 0, tokens 1..4 are scale 1.
  np.testing.assert_array_equal(token_scales((1, 2)), [0, 1, 1, 1, 1])
  causal = [[1, 0, 0, 0, 0]] + [[1, 1, 1, 1, 1]] * 4
  diagonal = [[1, 0, 0, 0, 0]] + [[0, 1, 1, 1, 1]] * 4
  np.testing.assert_array_equal(scale_mask((1, 2), "block_causal"), np.array(causal, bool))
  np.testing.assert_array_equal(scale_mask((1, 2), "block_diagonal"), np.array(diagonal, bool))


def test_the_oracle_gradients_match_central_differences():
  pn, rng = (1, 2), np.random.default_rng(2)
  q, k, v, g = (rng.standard_normal((1, 5, 1, 3)) for _ in range(4))
  for pattern in patterns.PATTERNS:
    _, grads = attention_f64(q, k, v, pn, pattern, d_out=g)
    for which, grad in enumerate(grads):
      numeric = np.zeros_like(grad)
      for idx in np.ndindex(grad.shape):
        plus, minus = [q.copy(), k.copy(), v.copy()], [q.copy(), k.copy(), v.copy()]
        plus[which][idx] += 1e-6
        minus[which][idx] -= 1e-6
        numeric[idx] = ((attention_f64(*plus, pn, pattern) - attention_f64(*minus, pn, pattern)) * g).sum() / 2e-6
      np.testing.assert_allclose(grad, numeric, atol=1e-7, err_msg=f"{pattern} grad {'qkv'[which]}")


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
@pytest.mark.parametrize("pn", [(1, 2, 3, 5), (2, 3, 7), (4,), PN_256])
def test_dense_mask_is_the_patterns_definition(pattern, pn):
  np.testing.assert_array_equal(patterns.dense_mask(pn, pattern), scale_mask(pn, pattern))


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_xla_reference_matches_float64_numpy_forward_and_grads(pattern):
  pn = (1, 2, 3, 5)
  length = 1 + 4 + 9 + 25
  rng = np.random.default_rng(0)
  q, k, v, g = (rng.standard_normal((2, length, 3, 16)).astype(np.float32) for _ in range(4))
  f = lambda q, k, v: reference.reference_attention(q, k, v, pn, pattern)
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(jnp.asarray(g))
  ref_out, ref_grads = attention_f64(q, k, v, pn, pattern, d_out=g)
  assert _rel(out, ref_out) < 1e-5
  for got, want in zip(grads, ref_grads):
    assert _rel(got, want) < 1e-5


def test_block_diagonal_token_ignores_other_scales():
  pn = (1, 2, 3)
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((1, 14, 1, 8)).astype(np.float32) for _ in range(3))
  out = reference.reference_attention(q, k, v, pn, "block_diagonal")
  v2 = v.copy()
  v2[:, :5] += 100.0  # scales 0 and 1: invisible to scale 2's tokens
  out2 = reference.reference_attention(q, k, v2, pn, "block_diagonal")
  np.testing.assert_allclose(out[:, 5:], out2[:, 5:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[:, :5], out2[:, :5])


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
@pytest.mark.parametrize(
  "pn,blocks", [((1, 2, 3, 4, 5), (8, 8)), ((2, 3, 7), (16, 8)), (PN_256, (64, 64)), (PN_256, (128, 32))]
)
def test_tile_schedule_matches_the_patterns_mask(pattern, pn, blocks):
  bq, bk = blocks
  sched = tiling.tile_schedule(pn, pattern, bq, bk)
  mask = scale_mask(pn, pattern)
  length = mask.shape[0]
  nq, nk = -(-length // bq), -(-length // bk)
  padded = np.zeros((nq * bq, nk * bk), bool)
  padded[:length, :length] = mask
  valid_row = np.arange(nq * bq) < length
  tiles = padded.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
  row_ok = valid_row.reshape(nq, 1, bq, 1)
  col_ok = (np.arange(nk * bk) < length).reshape(1, nk, 1, bk)
  np.testing.assert_array_equal(sched.touched, tiles.any(axis=(2, 3)))
  full = sched.touched & (tiles | ~row_ok).all(axis=(2, 3)) & col_ok.all(axis=(2, 3))
  np.testing.assert_array_equal(sched.full, full)
  rows, cols = sched.pairs_by_row(), sched.pairs_by_col()
  assert len(rows["q"]) == len(cols["q"]) == sched.num_touched
  np.testing.assert_array_equal(np.unique(rows["q"][rows["first"] == 1]), np.arange(nq))
  np.testing.assert_array_equal(np.unique(cols["k"][cols["last"] == 1]), np.arange(nk))


@pytest.mark.parametrize(
  "pn,pattern,elements",
  [
    # Anchors: official tile floor (ms) x 723.378 TFLOP/s / (4 B H D) with B8 H16 D64.
    (PN_256, "block_diagonal", 200704),
    (PN_256, "block_causal", 348160),
    (PN_512, "block_diagonal", 1585152),
    (PN_1024, "block_diagonal", 25739264),
    (PN_1024, "block_causal", 57729024),
  ],
)
def test_touched_64x64_tiles_match_official_tile_floor(pn, pattern, elements):
  assert tiling.touched_tile_elements(pn, pattern, 64) == elements


def test_auto_is_xla_on_cpu_and_unknown_implementation_is_rejected():
  assert api.resolve_implementation("auto", backend="cpu") == "xla"
  assert api.resolve_implementation("auto", backend="tpu") == "pallas_tpu"
  with pytest.raises(ValueError, match="unknown attention implementation"):
    api.resolve_implementation("flash")


@pytest.mark.parametrize("pattern", ["block_causal", "block_diagonal"])
def test_one_scale_on_the_triton_path_is_dense_attention_without_a_triton_kernel(pattern, monkeypatch):
  # A sampler's per-scale step attends within one scale: dense attention, which needs no Triton
  # kernel (each shape would compile one).
  def refuse(*a, **k):
    raise AssertionError("the Triton kernel was called for a single scale")

  monkeypatch.setattr(api.triton_gpu, "scale_attention_triton", refuse)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 25, 2, 64)), jnp.float32) for _ in range(3))
  out = api.scale_attention(q, k, v, (5,), pattern, implementation="triton")
  ref = api.scale_attention(q, k, v, (5,), pattern, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1 << 30, 2 * 2 * 25 * 4 * 7])  # one chunk; 7 query rows a chunk (25 = 3 x 7 + 4)
def test_one_scale_in_query_chunks_is_softmax_attention(budget):
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((2, 25, 2, 64)) for _ in range(3))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  got = api.single_scale_attention(f32(q), f32(k), f32(v), 0.3, max_logits_bytes=budget)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_one_large_scale_holds_one_chunk_of_logits_not_all_of_them():
  # HMAR's 64 x 64 scale at 1024 px wrote 8.6 GB of float32 logits at once; in chunks, the scratch
  # is a fraction of the whole logits (here 33.5 MB whole, 1 MiB a chunk).
  q = jax.ShapeDtypeStruct((1, 2048, 2, 64), jnp.float32)
  whole = 1 * 2 * 2048 * 2048 * 4

  def temp(budget):
    f = jax.jit(lambda q, k, v: api.single_scale_attention(q, k, v, 0.125, max_logits_bytes=budget))
    return f.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

  assert temp(1 << 40) >= whole
  assert temp(1 << 20) < whole / 4
