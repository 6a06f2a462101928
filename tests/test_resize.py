"""Resize parity: area and bicubic resizes equal torch.nn.functional.interpolate.

The quantizer resizes between every pair of token grids of a `patch_nums` list,
so parity is checked for every ordered pair of sizes of the three official
layouts: exactly (float64) for the 1-D weight matrices, to < 1e-5 in float32 on
random inputs, and end to end through the jitted NHWC functions.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmar_jax.tokenizer import resize

PATCH_NUMS = {
  256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
  1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
ALL_SIZES = sorted(set(itertools.chain(*PATCH_NUMS.values())))
# Every ordered pair within each list is contained in the pairs of the union.
ALL_PAIRS = list(itertools.product(ALL_SIZES, ALL_SIZES))
MODES = {"area": (resize.area_matrix, resize.area_resize), "bicubic": (resize.bicubic_matrix, resize.bicubic_resize)}
F32_TOL = 1e-5


def torch_resize_nhwc(x, size, mode):
  """Reference: torch F.interpolate on an NHWC NumPy array, back to NHWC."""
  t = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
  kwargs = {"align_corners": False} if mode == "bicubic" else {}
  y = F.interpolate(t, size=tuple(size), mode=mode, **kwargs)
  return np.transpose(y.numpy(), (0, 2, 3, 1))


def _torch_matrix(n_in, n_out, mode, dtype):
  """torch's 1-D weights: resizing an identity along H gives them as columns."""
  eye = torch.eye(n_in, dtype=dtype)[None, None]  # NCHW (1, 1, H=n_in, W=n_in)
  kwargs = {"align_corners": False} if mode == "bicubic" else {}
  return F.interpolate(eye, size=(n_out, n_in), mode=mode, **kwargs)[0, 0].double().numpy()


@pytest.mark.parametrize("mode", MODES)
def test_weight_matrices_equal_torch_float64_for_every_size_pair(mode):
  # torch does a float64 input's coordinate math in float64: exact agreement.
  matrix_fn, _ = MODES[mode]
  kwargs = {"opmath_dtype": np.float64} if mode == "bicubic" else {}
  for n_in, n_out in ALL_PAIRS:
    np.testing.assert_allclose(
      matrix_fn(n_in, n_out, **kwargs),
      _torch_matrix(n_in, n_out, mode, torch.float64),
      rtol=0,
      atol=1e-12,
      err_msg=f"{mode} {n_in} -> {n_out}",
    )


def test_default_bicubic_matrices_reproduce_torch_float32_rounding():
  # For float32 inputs torch computes coordinates and weights in float32; the
  # exact weights would be up to ~2.5e-6 away at 64 cells, ours are ~2e-7 away.
  for n_in, n_out in ALL_PAIRS:
    np.testing.assert_allclose(
      resize.bicubic_matrix(n_in, n_out),
      _torch_matrix(n_in, n_out, "bicubic", torch.float32),
      rtol=0,
      atol=5e-7,
      err_msg=f"{n_in} -> {n_out}",
    )


@pytest.mark.parametrize("mode", MODES)
def test_float32_random_inputs_match_torch_for_every_size_pair(mode):
  # The float32 arithmetic of the functions (matrices cast to float32, two
  # contractions), on random data, for all pairs without one compile per pair.
  matrix_fn, _ = MODES[mode]
  rng = np.random.default_rng(0)
  worst = 0.0
  for n_in, n_out in ALL_PAIRS:
    x = rng.standard_normal((2, n_in, n_in, 4)).astype(np.float32)
    m = matrix_fn(n_in, n_out).astype(np.float32)
    ours = np.einsum("ow,bhwc->bhoc", m, np.einsum("oh,bhwc->bowc", m, x))
    err = np.abs(ours - torch_resize_nhwc(x, (n_out, n_out), mode)).max()
    worst = max(worst, err)
    assert err < F32_TOL, f"{mode} {n_in} -> {n_out}: max abs error {err}"
  assert worst > 0  # the comparison really ran in float32 on non-trivial data


def _tokenizer_pairs(patch_nums):
  """(in, out) pairs the tokenizer uses: top <-> every scale, both ways."""
  top = patch_nums[-1]
  return [(top, pn) for pn in patch_nums] + [(pn, top) for pn in patch_nums]


@pytest.mark.parametrize("mode", MODES)
def test_jitted_functions_match_torch_on_tokenizer_size_pairs(mode):
  # One compile for all pairs: each call resizes H along one pair and W along
  # the next, so it also covers non-square inputs and outputs.
  _, resize_fn = MODES[mode]
  pairs = list(itertools.chain(*(_tokenizer_pairs(p) for p in PATCH_NUMS.values())))
  calls = [(pairs[i], pairs[(i + 1) % len(pairs)]) for i in range(0, len(pairs), 2)]
  rng = np.random.default_rng(1)
  xs = [rng.standard_normal((2, hp[0], wp[0], 3)).astype(np.float32) for hp, wp in calls]
  outs = jax.jit(lambda xs: [resize_fn(x, (hp[1], wp[1])) for x, (hp, wp) in zip(xs, calls)])(xs)
  for x, y, (hp, wp) in zip(xs, outs, calls):
    assert y.dtype == jnp.float32 and y.shape == (2, hp[1], wp[1], 3)
    err = np.abs(np.asarray(y) - torch_resize_nhwc(x, (hp[1], wp[1]), mode)).max()
    assert err < F32_TOL, f"{mode} {x.shape[1:3]} -> {(hp[1], wp[1])}: max abs error {err}"


@pytest.mark.parametrize("mode", MODES)
def test_non_square_resize_matches_torch(mode):
  _, resize_fn = MODES[mode]
  x = np.random.default_rng(2).standard_normal((3, 16, 13, 5)).astype(np.float32)
  sizes = [(5, 21), (13, 16), (1, 7), (24, 2)]
  outs = jax.jit(lambda x: [resize_fn(x, size) for size in sizes])(x)
  for size, y in zip(sizes, outs):
    err = np.abs(np.asarray(y) - torch_resize_nhwc(x, size, mode)).max()
    assert err < F32_TOL, f"{mode} (16, 13) -> {size}: max abs error {err}"


@pytest.mark.parametrize("mode", MODES)
def test_same_size_returns_input_unchanged(mode):
  _, resize_fn = MODES[mode]
  x = jnp.arange(2 * 6 * 4 * 3, dtype=jnp.float32).reshape(2, 6, 4, 3)
  assert resize_fn(x, (6, 4)) is x


def test_area_resize_preserves_the_mean_for_integer_ratios():
  # Non-overlapping windows of equal size: the global mean is unchanged.
  x = np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32)
  sizes = (1, 2, 4, 8)
  outs = jax.jit(lambda x: [resize.area_resize(x, (n, n)) for n in sizes])(x)
  for y in outs:
    np.testing.assert_allclose(np.asarray(y).mean((1, 2)), x.mean((1, 2)), atol=1e-6)


def test_area_windows_overlap_for_non_integer_ratio():
  # torch adaptive_avg_pool: 16 -> 13, cell i covers [floor(16i/13), ceil(16(i+1)/13)).
  m = resize.area_matrix(16, 13)
  assert np.allclose(m.sum(1), 1.0)
  assert ((m > 0).sum(0) > 1).any()  # some input cells feed two outputs
  np.testing.assert_array_equal(np.nonzero(m[1])[0], [1, 2])  # [1, ceil(32/13))
  np.testing.assert_array_equal(np.nonzero(m[2])[0], [2, 3])  # cell 2 is shared


def test_bicubic_uses_a_minus_075_not_jax_image_resize():
  # jax.image.resize's 'cubic' is Keys with a = -0.5 (and antialiases when
  # shrinking), so it is not torch's bicubic; ours is built from dot_generals only.
  x = np.random.default_rng(4).standard_normal((1, 4, 4, 1)).astype(np.float32)
  ref = torch_resize_nhwc(x, (16, 16), "bicubic")
  ours = np.asarray(resize.bicubic_resize(x, (16, 16)))
  theirs = np.asarray(jax.image.resize(x, (1, 16, 16, 1), "cubic"))
  assert np.abs(ours - ref).max() < F32_TOL
  assert np.abs(theirs - ref).max() > 1e-3
  for fn in (resize.area_resize, resize.bicubic_resize):
    jaxpr = jax.make_jaxpr(lambda x, fn=fn: fn(x, (3, 7)))(np.zeros((2, 16, 13, 3), np.float32))
    prims = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert prims <= {"dot_general", "transpose", "convert_element_type"}, prims


@pytest.mark.parametrize("size", [(0, 4), (4, -1), (4,), (4, 4, 4), 4, (2.5, 3), None])
def test_bad_size_raises_clear_value_error(size):
  x = np.zeros((1, 8, 8, 3), np.float32)
  for fn in (resize.area_resize, resize.bicubic_resize):
    with pytest.raises(ValueError, match="size"):
      fn(x, size)


@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 1, 8, 8, 3), (8,)])
def test_wrong_rank_raises_clear_value_error(shape):
  for fn in (resize.area_resize, resize.bicubic_resize):
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
      fn(np.zeros(shape, np.float32), (4, 4))


def test_matrix_builders_reject_non_positive_lengths():
  for fn in (resize.area_matrix, resize.bicubic_matrix):
    with pytest.raises(ValueError, match="n_out"):
      fn(4, 0)
    with pytest.raises(ValueError, match="n_in"):
      fn(-2, 4)
