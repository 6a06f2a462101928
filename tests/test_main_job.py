"""The README's main job runs every stage end to end and leaves PNGs a person can look at.

The test's run is short (tens of steps instead of the config's ~2000), too short for a model to
draw class-specific shapes or colours: its samples are smooth, near-uniform images in the
training data's average colour. So the PNGs are checked for what such a run does show: tiles
laid out one row per class, each a decoded image (not flat, spatially smooth) whose colour is
the data's, which neither an all-black grid nor noise has.
"""

import os

import numpy as np
import pytest
from PIL import Image

from hmar_jax import config_utils
from hmar_jax.data import ProceduralShapes
from hmar_jax.main import run_quickstart

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAD = 2  # hmar_jax.image_grid's default padding between tiles
# Thresholds of _check_decoded_tiles. Decoded tiles of the short run: std >= 4 grey levels, mean
# neighbouring-pixel correlation ~0.5, colour within ~10 levels of the data's. i.i.d. noise has
# correlation ~0.
MIN_TILE_STD = 2.0
MIN_NEIGHBOUR_CORRELATION = 0.3
MAX_COLOUR_OFFSET = 25.0


def _tiles(grid: np.ndarray, rows: int, cols: int, size: int) -> np.ndarray:
  """(rows, cols, size, size, 3) float64 tiles of a uint8 PNG grid with white PAD-pixel borders.

  Asserts the layout: exactly rows x cols tiles, and every border pixel white.
  """
  step = size + PAD
  assert grid.shape == (PAD + rows * step, PAD + cols * step, 3), grid.shape
  corners = [(PAD + r * step, PAD + c * step) for r in range(rows) for c in range(cols)]
  border = np.ones(grid.shape[:2], bool)
  for y, x in corners:
    border[y : y + size, x : x + size] = False
  assert (grid[border] == 255).all(), "tile borders are not the white padding"
  tiles = np.stack([grid[y : y + size, x : x + size] for y, x in corners])
  return tiles.reshape(rows, cols, size, size, 3).astype(np.float64)


def _neighbour_correlation(tiles: np.ndarray) -> np.ndarray:
  """(...,) the smaller of the horizontal and vertical lag-1 pixel correlations of (..., H, W, C) tiles."""
  out = []
  for a, b in ((tiles[..., 1:, :, :], tiles[..., :-1, :, :]), (tiles[..., :, 1:, :], tiles[..., :, :-1, :])):
    a = a - a.mean(axis=(-3, -2, -1), keepdims=True)
    b = b - b.mean(axis=(-3, -2, -1), keepdims=True)
    cov = (a * b).sum(axis=(-3, -2, -1))
    out.append(cov / np.sqrt((a * a).sum(axis=(-3, -2, -1)) * (b * b).sum(axis=(-3, -2, -1)) + 1e-12))
  return np.minimum(*out)


def _check_decoded_tiles(tiles: np.ndarray, data_colour: np.ndarray) -> None:
  """Asserts that (..., H, W, 3) tiles (0..255) look like decoded images of the training data.

  Each tile varies (not flat: an all-black or blank grid fails), neighbouring pixels are
  correlated (images are smooth; i.i.d. noise is not), and the tiles' mean colour is within
  MAX_COLOUR_OFFSET grey levels of the training images' mean colour `data_colour` (3,).
  """
  stds = tiles.std(axis=(-3, -2, -1))
  assert stds.min() >= MIN_TILE_STD, f"flat tiles: pixel std {stds.min():.2f} < {MIN_TILE_STD}"
  corr = _neighbour_correlation(tiles).mean()
  assert corr >= MIN_NEIGHBOUR_CORRELATION, (
    f"not smooth images: mean neighbouring-pixel correlation {corr:.3f} < {MIN_NEIGHBOUR_CORRELATION}"
  )
  colour = tiles.reshape(-1, 3).mean(0)
  offset = np.abs(colour - data_colour).max()
  assert offset <= MAX_COLOUR_OFFSET, (
    f"mean colour {np.round(colour, 1)} is {offset:.1f} levels from the data's {np.round(data_colour, 1)}"
  )


def _data_colour(data_config, size: int, n: int = 200) -> np.ndarray:
  """(3,) mean RGB (0..255) of the first n training images of a procedural data config."""
  src = ProceduralShapes(n, size, seed=int(data_config.seed), num_classes=int(data_config.num_classes))
  return np.stack([src[i]["image"] for i in range(n)]).reshape(-1, 3).mean(0)


def test_quickstart_runs_all_stages_with_few_steps(tmp_path):
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
  config.tokenizer.train.num_steps = 10
  config.tokenizer.optim.warmup_steps = 2
  config.nsp.train.num_steps = 10
  config.nsp.data.num_examples = 256
  config.mask.train.num_steps = 5
  config.sample.per_class = 2
  out = run_quickstart(config, str(tmp_path))

  num_classes, size = config.tokenizer.data.num_classes, config.tokenizer.model.image_size
  colour = _data_colour(config.tokenizer.data, size)
  # One row per class, per_class columns.
  samples = _tiles(np.asarray(Image.open(out["samples"])), num_classes, config.sample.per_class, size)
  _check_decoded_tiles(samples, colour)
  # Row pairs: 8 held-out originals, then their reconstructions.
  pairs = -(-int(config.tokenizer.data.num_eval_images) // 8)
  recon = _tiles(np.asarray(Image.open(out["reconstructions"])), 2 * pairs, 8, size)
  _check_decoded_tiles(recon[1::2], colour)
  assert os.path.isdir(out["mask_params"]) and os.path.isdir(out["nsp_params"])
  # Finetuning reuses the next-scale stage's token cache instead of tokenising again.
  assert not os.path.exists(tmp_path / "mask" / "tokens")


# The check above must be able to fail: grids that a broken sampler could write.


def _data_like_tiles(shape) -> tuple[np.ndarray, np.ndarray]:
  """(tiles (shape) of procedural images, their mean colour (3,))."""
  n = int(np.prod(shape[:-3]))
  src = ProceduralShapes(n, shape[-2])
  tiles = np.stack([src[i]["image"] for i in range(n)]).reshape(shape).astype(np.float64)
  return tiles, tiles.reshape(-1, 3).mean(0)


def test_the_grid_check_accepts_real_images():
  tiles, colour = _data_like_tiles((10, 2, 32, 32, 3))
  _check_decoded_tiles(tiles, colour)


def test_the_grid_check_refuses_an_all_black_grid():
  tiles, colour = _data_like_tiles((10, 2, 32, 32, 3))
  with pytest.raises(AssertionError, match="flat tiles"):
    _check_decoded_tiles(np.zeros_like(tiles), colour)


def test_the_grid_check_refuses_uniform_noise():
  tiles, colour = _data_like_tiles((10, 2, 32, 32, 3))
  noise = np.round(np.random.default_rng(0).uniform(0, 255, tiles.shape))
  with pytest.raises(AssertionError, match="not smooth images"):
    _check_decoded_tiles(noise, colour)


def test_the_grid_check_refuses_noise_in_the_datas_colour():
  # Noise with the data's mean colour and spread passes the flatness and colour checks: only
  # smoothness tells it apart.
  tiles, colour = _data_like_tiles((10, 2, 32, 32, 3))
  rng = np.random.default_rng(0)
  noise = np.clip(np.round(colour + tiles.std() * rng.standard_normal(tiles.shape)), 0, 255)
  with pytest.raises(AssertionError, match="not smooth images"):
    _check_decoded_tiles(noise, colour)


def test_the_grid_check_refuses_smooth_images_of_another_colour():
  tiles, colour = _data_like_tiles((10, 2, 32, 32, 3))
  with pytest.raises(AssertionError, match="levels from the data's"):
    _check_decoded_tiles(255 - tiles, colour)


def test_the_grid_check_refuses_a_grid_of_the_wrong_layout():
  grid = np.full((PAD + 9 * 34, PAD + 2 * 34, 3), 255, np.uint8)
  with pytest.raises(AssertionError):
    _tiles(grid, 10, 2, 32)


def test_a_stage_stopped_by_ctrl_c_ends_the_job_with_one_line_and_status_130(tmp_path, monkeypatch, capsys):
  import hmar_jax.main as main_module

  stopped = {"preempted": True, "stopped_by": "SIGINT", "step": 3, "checkpoint_dir": "ckpts"}
  monkeypatch.setattr(main_module, "train", lambda config, workdir: stopped)
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
  with pytest.raises(SystemExit) as exit_info:
    run_quickstart(config, str(tmp_path))
  assert exit_info.value.code == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["stopped by SIGINT at step 3: checkpoint saved in ckpts; rerun python -m hmar_jax.main to resume"]
