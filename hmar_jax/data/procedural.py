"""Built-in default data: procedurally drawn, class-conditional RGB images.

Nothing can be downloaded, so the main job and the tests train on images drawn
from the example index alone. A class is a (shape, colour) pair a person tells
apart at a glance:

  shapes:  disk, ring, square, triangle, cross, star, stripes, checkerboard,
           dots, target (concentric rings)
  colours: red, orange, yellow, lime, green, cyan, blue, violet, magenta, white

Class c draws shape c % 10 in colour (c % 10 + c // 10) % 10, so the first ten
classes each have their own shape and colour, and up to 100 classes are distinct
(shape, colour) pairs. Every example also gets its own position, size, rotation,
texture frequency, hue/brightness jitter, background gradient and grain noise,
drawn from a PRNG seeded by (seed, index): the same (seed, index) always gives
the same image, at any resolution (the drawing is resolution independent and
anti-aliased over one pixel).

Labels are balanced: example i has label i % num_classes.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

SHAPES = ("disk", "ring", "square", "triangle", "cross", "star", "stripes", "checkerboard", "dots", "target")
# (name, hue in [0, 1), saturation) of each foreground colour scheme.
COLOURS = (
  ("red", 0.00, 0.85),
  ("orange", 0.075, 0.9),
  ("yellow", 0.155, 0.85),
  ("lime", 0.25, 0.8),
  ("green", 0.38, 0.85),
  ("cyan", 0.50, 0.8),
  ("blue", 0.62, 0.85),
  ("violet", 0.75, 0.7),
  ("magenta", 0.86, 0.8),
  ("white", 0.0, 0.0),
)
MAX_CLASSES = len(SHAPES) * len(COLOURS)
MIN_IMAGE_SIZE = 8


def class_shape_and_colour(label: int) -> tuple[str, str]:
  """The (shape, colour) names of class `label`."""
  shape = label % len(SHAPES)
  colour = (shape + label // len(SHAPES)) % len(COLOURS)
  return SHAPES[shape], COLOURS[colour][0]


@functools.lru_cache(maxsize=16)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1]: u (1, size) along x, v (size, 1) along y."""
  c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  u = c[None, :]
  v = c[:, None]
  u.setflags(write=False)
  v.setflags(write=False)
  return u, v


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  """(3,) float32 RGB in [0, 1] of one HSV colour."""
  h = (h % 1.0) * 6.0
  i = int(h) % 6
  f = h - int(h)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.asarray(rgb, np.float32)


def _box(x, y, half_w, half_h):
  """Signed distance (negative inside) of an axis-aligned box, outside-exact up to corners."""
  return np.maximum(np.abs(x) - half_w, np.abs(y) - half_h)


def _shape_distance(shape: int, x, y, r: float, freq: float, phase: float) -> np.ndarray:
  """Approximate signed distance to the boundary of `shape` (negative inside).

  x, y: rotated coordinates relative to the shape centre (broadcastable
  arrays). r: shape radius; freq: texture frequency in cycles per unit length;
  phase: texture phase in [0, 1).
  """
  name = SHAPES[shape]
  two_pi_f = 2 * np.pi * freq
  if name == "disk":
    return np.sqrt(x * x + y * y) - r
  if name == "ring":
    return np.abs(np.sqrt(x * x + y * y) - 0.75 * r) - 0.2 * r
  if name == "square":
    return _box(x, y, 0.75 * r, 0.75 * r)
  if name == "triangle":
    # Equilateral: the max of three half-plane distances, inradius 0.6 r.
    d = None
    for k in range(3):
      a = np.pi / 2 + k * 2 * np.pi / 3
      dk = x * np.cos(a) + y * np.sin(a) - 0.6 * r
      d = dk if d is None else np.maximum(d, dk)
    return d
  if name == "cross":
    return np.minimum(_box(x, y, r, 0.27 * r), _box(x, y, 0.27 * r, r))
  if name == "star":
    # Five points with straight edges: fold the plane into the sector between a
    # tip (angle 0, radius r) and a valley (angle pi/5, radius 0.45 r), then take
    # the distance to the edge through those two points.
    rho = np.sqrt(x * x + y * y)
    sector = 2 * np.pi / 5
    a = np.abs((np.arctan2(y, x) + 2 * np.pi * phase) % sector - sector / 2) - sector / 2
    a = np.abs(a)  # angle from the nearest tip, in [0, pi/5]
    px, py = rho * np.cos(a), rho * np.sin(a)
    tx, ty = r, 0.0
    vx, vy = 0.45 * r * np.cos(sector / 2), 0.45 * r * np.sin(sector / 2)
    nx, ny = vy - ty, tx - vx  # outward normal of the edge tip -> valley
    norm = np.hypot(nx, ny)
    return ((px - tx) * nx + (py - ty) * ny) / norm
  if name == "stripes":
    return np.sin(two_pi_f * x + 2 * np.pi * phase) / two_pi_f
  if name == "checkerboard":
    return np.sin(two_pi_f * x) * np.sin(two_pi_f * y + 2 * np.pi * phase) / two_pi_f
  if name == "dots":
    g = 1.0 / freq
    lx = ((x / g + phase) % 1.0 - 0.5) * g
    ly = ((y / g + phase) % 1.0 - 0.5) * g
    return np.sqrt(lx * lx + ly * ly) - 0.28 * g
  if name == "target":
    return np.sin(two_pi_f * np.sqrt(x * x + y * y)) / two_pi_f
  raise AssertionError(name)


def render(index: int, image_size: int, *, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, int]:
  """Draws example `index` of the procedural dataset.

  Args:
    index: non-negative example index.
    image_size: output height = width in pixels.
    seed: dataset seed; (seed, index) fully determines the image.
    num_classes: number of classes (<= MAX_CLASSES); label = index % num_classes.

  Returns:
    (image (image_size, image_size, 3) uint8 RGB, label int).
  """
  label = int(index) % num_classes
  shape = label % len(SHAPES)
  _, hue, sat = COLOURS[(shape + label // len(SHAPES)) % len(COLOURS)]
  rng = np.random.default_rng((int(seed), int(index)))
  (cx, cy, size_j, angle, freq_j, phase, hue_j, sat_j, val_j, bg_h0, bg_h1, bg_s, bg_v0, bg_v1, bg_dir, noise_j) = (
    rng.random(16)
  )

  u, v = _pixel_grid(image_size)
  textured = SHAPES[shape] in ("stripes", "checkerboard", "dots", "target")
  # Textures fill the image around a jittered centre; shapes sit inside it.
  jitter = 0.25 if not textured else 1.0
  x0, y0 = (cx - 0.5) * 2 * jitter, (cy - 0.5) * 2 * jitter
  r = 0.45 + 0.25 * size_j
  theta = 2 * np.pi * angle
  c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
  x, y = u - np.float32(x0), v - np.float32(y0)
  xr, yr = c * x + s * y, c * y - s * x
  # 1.2 to 2 cycles per unit (2.4 to 4 per image width): >= 4 px per period at 16 px.
  freq = 1.2 + 0.8 * freq_j
  d = _shape_distance(shape, xr, yr, r, freq, phase)
  pixel = 2.0 / image_size
  mask = np.clip(0.5 - d * np.float32(1.0 / pixel), 0.0, 1.0)[..., None]  # (H, W, 1)

  fg = _hsv_to_rgb(hue + 0.03 * (hue_j - 0.5), sat * (0.85 + 0.15 * sat_j), 0.8 + 0.2 * val_j)
  bg0 = _hsv_to_rgb(bg_h0, 0.35 * bg_s, 0.08 + 0.3 * bg_v0)
  bg1 = _hsv_to_rgb(bg_h1, 0.35 * bg_s, 0.08 + 0.3 * bg_v1)
  alpha = 2 * np.pi * bg_dir
  ramp = np.clip(0.5 + 0.5 * (u * np.float32(np.cos(alpha)) + v * np.float32(np.sin(alpha))), 0, 1)
  bg = bg0 + (bg1 - bg0) * ramp[..., None]  # (H, W, 3)
  img = bg + (fg - bg) * mask
  noise = rng.standard_normal((image_size, image_size, 1), dtype=np.float32)
  img = img + np.float32(0.03 * noise_j) * noise
  return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), label


class ProceduralShapes:
  """Random-access (grain) data source of procedural class-conditional images.

  Follows grain.python.RandomAccessDataSource: `len(source)` and
  `source[i] -> {'image': (image_size, image_size, 3) uint8, 'label': int32 ()}`.
  Records are drawn on access (no storage); any index in [0, num_examples) works
  in any order, from any worker, with the same result.
  """

  def __init__(self, num_examples: int, image_size: int, seed: int = 0, num_classes: int = 10):
    for name, value, low in (
      ("num_examples", num_examples, 1),
      ("image_size", image_size, MIN_IMAGE_SIZE),
      ("seed", seed, 0),
      ("num_classes", num_classes, 1),
    ):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"ProceduralShapes: {name} must be an int >= {low}, got {value!r}")
    if num_classes > MAX_CLASSES:
      raise ValueError(
        f"ProceduralShapes: num_classes must be <= {MAX_CLASSES} "
        f"({len(SHAPES)} shapes x {len(COLOURS)} colours), got {num_classes}"
      )
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.num_classes = int(num_classes)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for ProceduralShapes of length {self.num_examples}")
    image, label = render(index, self.image_size, seed=self.seed, num_classes=self.num_classes)
    return {"image": image, "label": np.int32(label)}

  def __repr__(self) -> str:
    return (
      f"ProceduralShapes(num_examples={self.num_examples}, image_size={self.image_size}, "
      f"seed={self.seed}, num_classes={self.num_classes})"
    )
