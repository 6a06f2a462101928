"""The `data` settings of the training configs: the training transform (config.data.augment), the
token cache settings, and the sources a task builds from them."""

import os

import numpy as np
import pytest
from PIL import Image
from training_helpers import nsp_config, tokenizer_config

from hmar_jax.data.loader import make_train_loader
from hmar_jax.data.sources import ImageFolder
from hmar_jax.training import schema
from hmar_jax.training.tasks.tokenizer import TokenizerTask


@pytest.fixture
def wide_images(tmp_path):
  """A folder of 2 classes x 4 wide images (24 x 48) with random pixels."""
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    os.makedirs(tmp_path / "images" / cls)
    for i in range(4):
      Image.fromarray(rng.integers(0, 255, (24, 48, 3), np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
  return tmp_path / "images"


def test_the_official_random_crop_is_the_default_training_transform():
  for task in schema.TASKS:
    # MAR and Hi-MAR: the official center_crop_arr (then a flip drawn in the step), main_mar.py.
    want = "center_crop" if task in ("mar", "himar") else "random_crop"
    assert schema.default_config(task).data.augment == want, task


@pytest.mark.parametrize(
  ("field", "value", "match"),
  [
    ("augment", "flip", r"config.data.augment must be one of \('random_crop', 'center_crop'\), got 'flip'"),
    ("tokens_chunk_size", 0, "config.data.tokens_chunk_size must be a positive int, got 0"),
  ],
)
def test_bad_data_settings_are_named(field, value, match):
  config = nsp_config("hmar")
  config.data[field] = value
  with pytest.raises(schema.ConfigError, match=match):
    schema.validate(config)


def test_a_token_cache_path_naming_a_file_is_refused(tmp_path):
  config = nsp_config("hmar")
  (tmp_path / "tokens.npz").write_bytes(b"an old single-file cache")
  config.data.tokens_cache = str(tmp_path / "tokens.npz")
  with pytest.raises(schema.ConfigError, match=r"tokens_cache .*tokens.npz' is a file; the token cache is a directory"):
    schema.validate(config)


def _first_batch(task, batch=8, seed=0):
  return next(iter(make_train_loader(task.train_source(), global_batch=batch, seed=seed, num_threads=0)))


def test_the_tokenizer_trains_on_random_crops_and_evaluates_center_crops(wide_images, tmp_path):
  config = tokenizer_config()
  config.data.source, config.data.path = "folder", str(wide_images)
  task = TokenizerTask(config, str(tmp_path / "run"))
  size = int(config.model.image_size)
  centers = {ImageFolder(wide_images, size)[i]["image"].tobytes() for i in range(8)}
  batch = _first_batch(task)["image"]
  assert batch.shape == (8, size, size, 3)
  assert sum(crop.tobytes() not in centers for crop in batch) > 0  # some crops are off center
  evaluation = (task.eval_images() + 1) * 255 / 2
  assert {np.rint(im).astype(np.uint8).tobytes() for im in evaluation} <= centers


def test_the_tokenizer_with_center_crop_trains_on_the_evaluation_transform(wide_images, tmp_path):
  config = tokenizer_config()
  config.data.source, config.data.path, config.data.augment = "folder", str(wide_images), "center_crop"
  task = TokenizerTask(config, str(tmp_path / "run"))
  folder = ImageFolder(wide_images, int(config.model.image_size))
  centers = {folder[i]["image"].tobytes() for i in range(8)}
  assert {crop.tobytes() for crop in _first_batch(task)["image"]} == centers
