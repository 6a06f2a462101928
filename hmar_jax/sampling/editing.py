"""Zero-shot editing: inpainting, outpainting and class-conditional editing as sampling from known tokens.

An edit is a sample whose token maps are partly given: the source image is tokenised by the VQVAE,
a mask says where it is regenerated, and the sampler (`Sampler.sample_indices(known=, keep=)`) keeps
the source's tokens everywhere else, at every scale. Inpainting regenerates a region inside the
image, outpainting everything around a kept region, class-conditional editing a region under
another class label; all three are the same call with another mask or label.

The keep mask of each scale follows VAR's zero-shot editing demo (demo_zero_shot_edit.ipynb): a
keep mask on the finest token grid is resized to the scale with bilinear interpolation
(align_corners=False, no antialiasing) and thresholded at 0.5, and the scales of at most 3 tokens
always keep the source's tokens (their one token sets the image's overall colour).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) float64 matrix of bilinear resampling with half-pixel centres and the
  source index clamped at 0 (PyTorch's F.interpolate(mode='bilinear', align_corners=False))."""
  w = np.zeros((size_out, size_in))
  for o in range(size_out):
    src = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
    i0 = min(int(np.floor(src)), size_in - 1)
    i1 = min(i0 + 1, size_in - 1)
    frac = src - i0
    w[o, i0] += 1.0 - frac
    w[o, i1] += frac
  return w


def pixel_to_token_keep(regenerate: np.ndarray, grid: int) -> np.ndarray:
  """(B, grid, grid) float in [0, 1]: the kept share of each finest-scale token's pixels.

  regenerate: (B, H, W) bool (or (H, W)), True where the image is regenerated (white in a mask
  PNG); H and W must be multiples of `grid` (each token covers an H/grid x W/grid patch).
  """
  regenerate = np.asarray(regenerate, bool)
  if regenerate.ndim == 2:
    regenerate = regenerate[None]
  if regenerate.ndim != 3:
    raise ValueError(f"the edit mask must be (H, W) or (B, H, W), got shape {regenerate.shape}")
  b, h, w = regenerate.shape
  if h % grid or w % grid:
    raise ValueError(f"the edit mask's size {h}x{w} is not a multiple of the {grid}x{grid} token grid")
  patches = (~regenerate).reshape(b, grid, h // grid, grid, w // grid)
  return patches.mean(axis=(2, 4))


def scale_keep_masks(token_keep: np.ndarray, patch_nums: Sequence[int]) -> list[np.ndarray]:
  """[(B, pn, pn) bool] per scale, True where the source's token is kept.

  token_keep: (B, P, P) float in [0, 1] on the finest grid (P = patch_nums[-1]), e.g. from
  pixel_to_token_keep. Each scale: bilinear resize to (pn, pn), keep where > 0.5; scales of at
  most 3 tokens keep everything (VAR's demo).
  """
  token_keep = np.asarray(token_keep, np.float64)
  grid = int(patch_nums[-1])
  if token_keep.ndim != 3 or token_keep.shape[1:] != (grid, grid):
    raise ValueError(f"token_keep must be (B, {grid}, {grid}), got shape {token_keep.shape}")
  out = []
  for pn in patch_nums:
    pn = int(pn)
    if pn * pn <= 3:
      out.append(np.ones((token_keep.shape[0], pn, pn), bool))
      continue
    w = _bilinear_weights(grid, pn)
    out.append(np.einsum("oi,bij,pj->bop", w, token_keep, w) > 0.5)
  return out


def edit(
  sampler,
  vqvae,
  images: jax.Array,
  regenerate: np.ndarray,
  labels,
  key,
  *,
  edit_mode: str = "force",
  **sample_kwargs,
) -> tuple[jax.Array, list[jax.Array], list[np.ndarray]]:
  """Edits `images` where `regenerate` is True. Returns (edited images (B, H, W, 3) in [0, 1],
  token maps [(B, pn, pn) int32], keep masks [(B, pn, pn) bool]), the last two one per scale.

  images: (B, H, W, 3) float in [-1, 1] at the tokenizer's resolution; regenerate: (B, H, W) or
  (H, W) bool; labels: (B,) class ids (another class than the source's: class-conditional editing);
  key: PRNG key or int seed; edit_mode and the other keywords as Sampler.sample_indices.
  Raises ValueError on mismatched shapes before anything is compiled.
  """
  images = jnp.asarray(images, jnp.float32)
  vqvae.check_images(images)
  b = images.shape[0]
  regenerate = np.asarray(regenerate, bool)
  if regenerate.ndim == 2:
    regenerate = np.broadcast_to(regenerate, (b, *regenerate.shape))
  if regenerate.shape != images.shape[:3]:
    raise ValueError(f"the edit mask is {regenerate.shape[1:]} but the images are {images.shape[1:3]}")
  keep = scale_keep_masks(pixel_to_token_keep(regenerate, sampler.patch_nums[-1]), sampler.patch_nums)
  graphdef, state = nnx.split(vqvae)
  known = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_indices(x))(state, images)
  maps, f_hat = sampler.sample_indices(labels, key, known=known, keep=keep, edit_mode=edit_mode, **sample_kwargs)
  return sampler.decode(f_hat), maps, keep
