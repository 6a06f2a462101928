"""ImageNet through TensorFlow Datasets (tfds.testing.mock_data: no download, no TensorFlow).

The mock serves random records (images of random sizes, labels in [0, 1000)) from a random-access
data source wherever a prepared dataset would be read; the dataset's metadata (its splits, the
array_record format) is written into tmp_path first, so tfds_source's checks of a prepared dataset
run as they do on a real one.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

from hmar_jax.data.augment import RandomCrop
from hmar_jax.data.loader import make_train_loader
from hmar_jax.data.sources import center_crop, tfds_source

SIZE = 16
EXAMPLES = 24


@pytest.fixture
def imagenet(tmp_path):
  """A tfds data_dir whose imagenet2012 reads mocked records; yields the data_dir."""
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path), file_format="array_record")
  builder.info.set_splits(
    splits_lib.SplitDict(
      [
        splits_lib.SplitInfo(name=name, shard_lengths=[EXAMPLES], num_bytes=0, filename_template=None)
        for name in ("train", "validation")
      ]
    )
  )
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  with tfds.testing.mock_data(num_examples=EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
    yield str(tmp_path)


def _take(loader, steps):
  it = iter(loader)
  return [next(it) for _ in range(steps)]


def test_imagenet_records_are_center_crops_with_imagenet_labels(imagenet):
  source = tfds_source("imagenet2012", "train", SIZE, data_dir=imagenet)
  assert len(source) == EXAMPLES
  for i in (0, EXAMPLES - 1):
    record = source[i]
    assert record["image"].shape == (SIZE, SIZE, 3) and record["image"].dtype == np.uint8
    assert record["label"].dtype == np.int32 and 0 <= record["label"] < 1000
  assert len({source[i]["image"].tobytes() for i in range(4)}) == 4  # distinct images, not one repeated


def test_imagenet_uncropped_records_keep_the_aspect_ratio_and_center_crop_to_the_eval_records(imagenet):
  evaluation = tfds_source("imagenet2012", "train", SIZE, data_dir=imagenet)
  uncropped = tfds_source("imagenet2012", "train", SIZE, data_dir=imagenet, crop="none")
  for i in range(4):
    image = uncropped[i]["image"]
    assert min(image.shape[:2]) == round(1.125 * SIZE) and image.shape[2] == 3
    np.testing.assert_array_equal(center_crop(image, SIZE), evaluation[i]["image"])
    assert uncropped[i]["label"] == evaluation[i]["label"]


def test_imagenet_training_crops_are_windows_of_the_resized_images(imagenet):
  uncropped = tfds_source("imagenet2012", "train", SIZE, data_dir=imagenet, crop="none")
  batches = _take(make_train_loader(RandomCrop(uncropped, SIZE), global_batch=8, seed=0, num_threads=0), 3)
  images = {uncropped[i]["image"].tobytes(): uncropped[i]["image"] for i in range(EXAMPLES)}
  resized = list(images.values())
  off_center = 0
  for batch in batches:
    assert batch["image"].shape == (8, SIZE, SIZE, 3)
    for crop in batch["image"]:
      # Each crop is a window of one of the resized images (searched exhaustively).
      windows = [
        (image, top, left)
        for image in resized
        for top in range(image.shape[0] - SIZE + 1)
        for left in range(image.shape[1] - SIZE + 1)
        if np.array_equal(image[top : top + SIZE, left : left + SIZE], crop)
      ]
      assert windows, "a training crop is not a window of any resized image"
      off_center += not np.array_equal(center_crop(windows[0][0], SIZE), crop)
  assert off_center > 0  # random, not the center crop


@pytest.mark.parametrize("crop", ["random", "center"])
def test_imagenet_per_process_slices_are_disjoint_and_make_the_one_process_batch(imagenet, crop):
  if crop == "random":
    source = RandomCrop(tfds_source("imagenet2012", "train", SIZE, data_dir=imagenet, crop="none"), SIZE)
  else:
    source = tfds_source("imagenet2012", "train", SIZE, data_dir=imagenet)
  whole = _take(make_train_loader(source, global_batch=8, seed=5, num_threads=2), 4)
  halves = [
    _take(make_train_loader(source, global_batch=8, seed=5, process_index=p, process_count=2, num_threads=2), 4)
    for p in range(2)
  ]
  for t in range(4):
    a, b = halves[0][t]["image"], halves[1][t]["image"]
    assert a.shape == b.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.concatenate([a, b]), whole[t]["image"])
    np.testing.assert_array_equal(np.concatenate([halves[0][t]["label"], halves[1][t]["label"]]), whole[t]["label"])
    assert not {x.tobytes() for x in a} & {x.tobytes() for x in b}


def test_imagenet_reads_in_worker_processes_as_in_threads(imagenet):
  source = RandomCrop(tfds_source("imagenet2012", "train", SIZE, data_dir=imagenet, crop="none"), SIZE)
  threads = _take(make_train_loader(source, global_batch=8, seed=1, num_threads=2), 4)
  workers = _take(make_train_loader(source, global_batch=8, seed=1, num_threads=1, worker_count=2), 4)
  for a, b in zip(threads, workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
