"""Writes a batch of images as one PNG grid (like torchvision.utils.save_image)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
  """Tiles (N, H, W, 3) images, floats in [0, 1], into one (H', W', 3) uint8 array, nrow per row."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images shaped (N, H, W, 3) or (N, H, W, 1), got {images.shape}")
  if images.dtype != np.uint8:
    images = np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, _ = images.shape
  ncol = max(1, min(nrow, n))
  nrows = math.ceil(n / ncol)
  fill = np.uint8(round(float(np.clip(pad_value, 0, 1)) * 255))
  grid = np.full((padding + nrows * (h + padding), padding + ncol * (w + padding), 3), fill, np.uint8)
  for i in range(n):
    r, c = divmod(i, ncol)
    y, x = padding + r * (h + padding), padding + c * (w + padding)
    grid[y : y + h, x : x + w] = images[i]
  return grid


def save_image_grid(path: str | os.PathLike, images: np.ndarray, nrow: int = 8, padding: int = 2) -> str:
  """Saves images (N, H, W, 3) in [0, 1] (or uint8) as a PNG grid; returns the path."""
  grid = make_grid(images, nrow=nrow, padding=padding)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)
  return path
