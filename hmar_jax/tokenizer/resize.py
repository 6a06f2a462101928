"""Image resizes that match PyTorch's, as separable matmuls.

The multi-scale quantizer moves feature maps between token grids with
`F.interpolate(mode='area')` (down) and `F.interpolate(mode='bicubic')` (up, and
HMAR also uses it down). `jax.image.resize` is neither: its 'cubic' uses a = -0.5
and it antialiases when shrinking, and it has no adaptive-average-pool mode. So
each resize here is written as two small matrices, one per spatial axis, built in
float64 NumPy at trace time from the static sizes and applied with einsum:

  y[b, i, j, c] = sum_{h, w} Mh[i, h] * Mw[j, w] * x[b, h, w, c]

All functions take NHWC arrays, (B, H, W, C).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's cubic convolution coefficient (aten/src/ATen/native/UpSample.h,
# get_cubic_upsample_coefficients: A = -0.75).
BICUBIC_A = -0.75


def _check_length(n: int, what: str) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
    raise ValueError(f"{what} must be a positive int, got {n!r}")
  return int(n)


@functools.cache
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 weights of 1-D adaptive average pooling.

  Output cell i averages input cells [floor(i * n_in / n_out),
  ceil((i + 1) * n_in / n_out)), as torch's adaptive_avg_pool2d does (which is
  what F.interpolate(mode='area') calls). For non-integer ratios the windows
  overlap (16 -> 13) or repeat cells (13 -> 16); for n_out > n_in it is a
  nearest-like replication.
  """
  n_in = _check_length(n_in, "n_in")
  n_out = _check_length(n_out, "n_out")
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    # Integer floor/ceil division: exact, unlike float division.
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  m.setflags(write=False)
  return m


def _madd(a, b, c):
  """a * b + c in the dtype of `a`, rounded once when that is float32.

  torch's compiled upsample kernels contract multiply-adds into FMAs (this is
  what reproduces its float32 weights to ~2e-7 instead of ~2.5e-6); a float32
  product is exact in float64, so one rounding of the float64 sum emulates an
  FMA. For float64 the plain expression is used (differences ~1e-16).
  """
  dt = np.asarray(a).dtype
  if dt == np.float32:
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)
  return a * b + c


def _cubic_weights(t: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
  """(..., 4) Keys cubic-convolution weights for taps at offsets -1, 0, 1, 2.

  Evaluated in t's dtype in the operation order of torch's
  get_cubic_upsample_coefficients (UpSample.h), because in float32 the far-tap
  polynomial cancels badly and torch's rounding shows at the 1e-6 level.
  """
  ct = t.dtype.type
  a, one = ct(a), ct(1)

  def near(d):  # |d| <= 1: ((a + 2) d - (a + 3)) d^2 + 1
    return _madd(_madd(a + ct(2), d, -(a + ct(3))) * d, d, one)

  def far(d):  # 1 < |d| < 2: ((a d - 5a) d + 8a) d - 4a
    return _madd(_madd(_madd(a, d, -(ct(5) * a)), d, ct(8) * a), d, -(ct(4) * a))

  return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


@functools.cache
def bicubic_matrix(n_in: int, n_out: int, opmath_dtype=np.float32) -> np.ndarray:
  """(n_out, n_in) float64 weights of 1-D bicubic interpolation.

  Matches torch's upsample_bicubic2d with align_corners=False and no
  antialias, for up- and downsampling: the source coordinate of output cell i is
  (i + 0.5) * n_in / n_out - 0.5 (not clamped at 0, unlike linear modes), the
  four taps around floor(src) get Keys weights with a = -0.75, and taps outside
  [0, n_in) are clamped to the border cell (their weight is added to it).
  torch uses scale = n_in / n_out when F.interpolate is given `size` (not
  `scale_factor`), which is how the quantizer calls it.

  Args:
    n_in, n_out: input and output lengths.
    opmath_dtype: precision of the coordinate and weight arithmetic. torch
      does it in the input's "opmath" type (UpSampleKernel.cpp,
      HelperInterpCubic: float32 for float32/bf16/fp16 inputs, float64 for
      float64). At 64 cells exact (float64) weights differ from torch's float32
      ones by up to ~2.5e-6, which moves outputs by ~1e-5, so the default
      reproduces torch's float32 rounding (to ~2e-7). Stored as float64.
  """
  n_in = _check_length(n_in, "n_in")
  n_out = _check_length(n_out, "n_out")
  if n_in == n_out:  # torch copies in this case; the formula also gives I.
    m = np.eye(n_out)
  else:
    ct = np.dtype(opmath_dtype).type
    scale = ct(n_in) / ct(n_out)
    src = _madd(np.full(n_out, scale, ct), np.arange(n_out).astype(ct) + ct(0.5), ct(-0.5))
    base = np.floor(src)
    w = _cubic_weights(src - base).astype(np.float64)  # (n_out, 4)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.ravel()), w.ravel())
  m.setflags(write=False)
  return m


def _check_resize_args(x, size) -> tuple[int, int]:
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"resize expects x of shape (B, H, W, C); got shape {getattr(x, 'shape', None)}")
  try:
    pair = tuple(size)
  except TypeError:
    pair = ()
  if len(pair) != 2:
    raise ValueError(f"size must be a pair (h, w) of positive ints, got {size!r}")
  h, w = pair
  return _check_length(h, "size[0] (height)"), _check_length(w, "size[1] (width)")


def _separable_resize(x: jax.Array, size, matrix_fn) -> jax.Array:
  h, w = _check_resize_args(x, size)
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (h, w):
    return x
  x = jnp.asarray(x, jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  if in_h != h:
    mh = jnp.asarray(matrix_fn(in_h, h), jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hp)
  if in_w != w:
    mw = jnp.asarray(matrix_fn(in_w, w), jnp.float32)
    x = jnp.einsum("ow,bhwc->bhoc", mw, x, precision=hp)
  return x


def area_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch F.interpolate(mode='area') (= adaptive_avg_pool2d), NHWC.

  Args:
    x: (B, H, W, C) float array.
    size: (h, w) output spatial size.

  Returns:
    (B, h, w, C) float32; x itself when (h, w) == (H, W).
  """
  return _separable_resize(x, size, area_matrix)


def bicubic_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch F.interpolate(mode='bicubic', align_corners=False), NHWC.

  No antialiasing, a = -0.75, border-clamped taps; works for up- and
  downsampling. The output is not clamped (bicubic can overshoot).

  Args:
    x: (B, H, W, C) float array.
    size: (h, w) output spatial size.

  Returns:
    (B, h, w, C) float32; x itself when (h, w) == (H, W).
  """
  return _separable_resize(x, size, bicubic_matrix)
