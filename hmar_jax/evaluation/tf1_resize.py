"""TensorFlow 1's `ResizeBilinear` (align_corners=False, half_pixel_centers=False), in JAX.

The ADM evaluator feeds float images into the Inception graph `classify_image_graph_def.pb`, whose
first ops resize to 299 x 299 with TF1's legacy bilinear kernel. Facts of that kernel (TF's
resize_bilinear_op.cc, "legacy" scaler):
  scale = in_size / out_size (float32);  src = dst * scale (no half-pixel offset);
  lower = floor(src);  upper = min(ceil(src), in_size - 1);  lerp = src - floor(src);
  top = tl + (tr - tl) * x_lerp;  bottom = bl + (br - bl) * x_lerp;  out = top + (bottom - top) * y_lerp.
No antialiasing, so downscaling samples only the two nearest source rows / columns. This is NOT
`jax.image.resize(..., 'bilinear')` (half-pixel centres, antialiased when shrinking).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def legacy_interpolation(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower [out] int32, upper [out] int32, lerp [out] float32) of TF1's legacy bilinear scaler."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale  # float32 throughout, as the TF kernel
  lower = np.floor(src)
  upper = np.minimum(np.ceil(src), in_size - 1)
  lerp = (src - lower).astype(np.float32)
  return lower.astype(np.int32), upper.astype(np.int32), lerp


def resize_bilinear_tf1(images: jnp.ndarray, out_height: int, out_width: int) -> jnp.ndarray:
  """images [N, H, W, C] (any real dtype) -> [N, out_height, out_width, C] float32."""
  x = jnp.asarray(images, jnp.float32)
  _, h, w, _ = x.shape
  if (h, w) == (out_height, out_width):
    return x  # scale 1: every source index is integral and every lerp 0
  y0, y1, ly = legacy_interpolation(h, out_height)
  x0, x1, lx = legacy_interpolation(w, out_width)
  top_rows, bottom_rows = jnp.take(x, y0, axis=1), jnp.take(x, y1, axis=1)
  lx = jnp.asarray(lx)[None, None, :, None]
  top = jnp.take(top_rows, x0, axis=2)
  top = top + (jnp.take(top_rows, x1, axis=2) - top) * lx
  bottom = jnp.take(bottom_rows, x0, axis=2)
  bottom = bottom + (jnp.take(bottom_rows, x1, axis=2) - bottom) * lx
  return top + (bottom - top) * jnp.asarray(ly)[None, :, None, None]
