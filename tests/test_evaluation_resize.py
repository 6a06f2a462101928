"""TF1's legacy bilinear resize (align_corners=False, half_pixel_centers=False), as the evaluator's graph."""

import jax
import numpy as np
import pytest

from hmar_jax.evaluation.tf1_resize import resize_bilinear_tf1


def _tf1_resize_reference(img, out_h, out_w):
  """Per-pixel TF1 definition: source coordinate = destination * (in / out), no half-pixel offset,
  bilinear between floor and min(floor + 1, size - 1); coordinates in float32 as TF's kernel, the
  interpolation in float64."""
  n, h, w, c = img.shape
  out = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    sy = float(np.float32(i) * (np.float32(h) / np.float32(out_h)))
    y0 = int(np.floor(sy))
    y1, fy = min(y0 + 1, h - 1), sy - y0
    for j in range(out_w):
      sx = float(np.float32(j) * (np.float32(w) / np.float32(out_w)))
      x0 = int(np.floor(sx))
      x1, fx = min(x0 + 1, w - 1), sx - x0
      top = img[:, y0, x0] * (1 - fx) + img[:, y0, x1] * fx
      bottom = img[:, y1, x0] * (1 - fx) + img[:, y1, x1] * fx
      out[:, i, j] = top * (1 - fy) + bottom * fy
  return out


@pytest.mark.parametrize(("size", "out"), [((16, 12), (29, 31)), ((40, 33), (13, 9)), ((7, 7), (7, 7))])
def test_resize_matches_the_tf1_definition(size, out):
  img = np.random.default_rng(0).integers(0, 256, (2, *size, 3)).astype(np.uint8)
  got = np.asarray(resize_bilinear_tf1(img, *out))
  np.testing.assert_allclose(got, _tf1_resize_reference(img.astype(np.float64), *out), rtol=1e-5, atol=1e-4)


def test_upscaling_to_299_matches_the_tf1_definition():
  img = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
  got = np.asarray(resize_bilinear_tf1(img, 299, 299))
  np.testing.assert_allclose(got, _tf1_resize_reference(img.astype(np.float64), 299, 299), rtol=1e-5, atol=1e-4)


def test_resize_differs_from_half_pixel_bilinear():
  # jax.image.resize uses half-pixel centres: the evaluator's graph does not.
  img = np.random.default_rng(2).integers(0, 256, (1, 16, 16, 3)).astype(np.float32)
  ours = np.asarray(resize_bilinear_tf1(img, 24, 24))
  half_pixel = np.asarray(jax.image.resize(img, (1, 24, 24, 3), "bilinear"))
  assert np.max(np.abs(ours - half_pixel)) > 1.0
