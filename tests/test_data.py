"""Built-in procedural data, user image sources, and the grain batching pipeline."""

import os
import pickle

import grain.python as grain_python
import numpy as np
import pytest
from absl import flags
from PIL import Image

from hmar_jax.data import (
  CorruptImageError,
  ImageFolder,
  ProceduralShapes,
  class_shape_and_colour,
  make_dataset,
  tfds_source,
)
from hmar_jax.data.procedural import COLOURS, MAX_CLASSES, SHAPES
from hmar_jax.data.sources import TfdsSource
from hmar_jax.tokenizer.resize import area_matrix


def _images(source, indices):
  return np.stack([source[i]["image"] for i in indices])


def _area_down(images, n):
  """(B, S, S, 3) -> (B, n, n, 3) float64 box-average, torch 'area' semantics."""
  m = area_matrix(images.shape[1], n)
  x = np.einsum("ow,bhwc->bhoc", m, images.astype(np.float64))
  return np.einsum("oh,bhwc->bowc", m, x)


# ----------------------------------------------------------------------------- procedural


def _check_grain_image_source(source, image_size: int) -> None:
  """Asserts what grain's RandomAccessDataSource asks of a source, for this project's records.

  grain: `len(source)`; `source[i]` for i in [0, len) returns the record, deterministically and
  from any thread; picklable for worker processes; a `__repr__` that identifies the source (its
  DataLoader checkpoints compare it), so not the default one naming a memory address. The
  records: {'image': (S, S, 3) uint8, 'label': int32 ()}.
  """
  n = len(source)
  assert isinstance(n, int) and n > 0, f"len() must be a positive int, got {n!r}"
  assert " at 0x" not in repr(source), f"repr {repr(source)!r} is not stable (names a memory address)"
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == n and repr(copy) == repr(source), f"pickled copy differs: {repr(copy)!r}"
  for i in sorted({0, n // 2, n - 1}):
    record = source[i]
    assert isinstance(record, dict) and set(record) == {"image", "label"}, f"record {i} is not an image record"
    image, label = record["image"], record["label"]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8, f"record {i}: image must be a uint8 array"
    assert image.shape == (image_size, image_size, 3), f"record {i}: image shape {image.shape}"
    assert isinstance(label, np.ndarray | np.generic) and label.dtype == np.int32 and label.shape == ()
    again, other = source[np.int64(i)], copy[i]
    for r in (again, other):
      np.testing.assert_array_equal(r["image"], image)
      assert r["label"] == label


@pytest.fixture
def one_image_root(tmp_path):
  for name, rgb in (("a", (200, 10, 10)), ("b", (10, 200, 10))):
    os.makedirs(tmp_path / name)
    for j in range(2):
      Image.new("RGB", (12, 10), rgb).save(tmp_path / name / f"{j}.png")
  return tmp_path


def test_sources_meet_grains_random_access_contract(one_image_root):
  _check_grain_image_source(ProceduralShapes(5, 16), 16)
  _check_grain_image_source(ImageFolder(one_image_root, 8), 8)


def test_the_source_check_refuses_a_plain_list_of_images():
  # A list has len, getitem, pickling and a stable repr, but its items are not image records.
  images = [np.zeros((16, 16, 3), np.uint8) for _ in range(3)]
  with pytest.raises(AssertionError, match="not an image record"):
    _check_grain_image_source(images, 16)


def test_the_source_check_refuses_a_source_with_an_address_in_its_repr():
  class Unnamed:
    def __len__(self):
      return 2

    def __getitem__(self, i):
      return {"image": np.zeros((8, 8, 3), np.uint8), "label": np.int32(i)}

  with pytest.raises(AssertionError, match="is not stable"):
    _check_grain_image_source(Unnamed(), 8)


@pytest.mark.parametrize("kind", ["procedural", "image_folder"])
def test_sources_feed_a_grain_data_loader_with_worker_processes(one_image_root, kind):
  source = ProceduralShapes(4, 16) if kind == "procedural" else ImageFolder(one_image_root, 8)
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; no absl app parsed them here
    flags.FLAGS.mark_as_parsed()
  sampler = grain_python.IndexSampler(len(source), grain_python.NoSharding(), shuffle=False, num_epochs=1)
  loader = grain_python.DataLoader(data_source=source, sampler=sampler, worker_count=1)
  records = list(loader)
  assert len(records) == len(source)
  for i, record in enumerate(records):
    np.testing.assert_array_equal(record["image"], source[i]["image"])
    assert record["label"] == source[i]["label"]


def test_same_index_gives_the_same_image_and_label():
  a, b = ProceduralShapes(100, 32, seed=3), ProceduralShapes(100, 32, seed=3)
  for i in (0, 7, 99):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    np.testing.assert_array_equal(a[i]["image"], a[i]["image"])
    assert a[i]["label"] == b[i]["label"]


def test_different_seeds_and_indices_give_different_images():
  a, b = ProceduralShapes(100, 32, seed=0), ProceduralShapes(100, 32, seed=1)
  assert not np.array_equal(a[5]["image"], b[5]["image"])
  assert not np.array_equal(a[5]["image"], a[15]["image"])  # same class, other example


@pytest.mark.parametrize("size", [16, 33, 64, 256])
def test_records_are_uint8_rgb_with_int32_labels_at_any_resolution(size):
  src = ProceduralShapes(20, size, num_classes=10)
  for i in (0, 13):
    rec = src[i]
    assert rec["image"].shape == (size, size, 3) and rec["image"].dtype == np.uint8
    assert rec["label"].dtype == np.int32 and rec["label"].shape == ()
    assert rec["image"].min() < 100 < rec["image"].max()  # not blank: a shape on a background


def test_1024_px_renders():
  image = ProceduralShapes(1, 1024)[0]["image"]
  assert image.shape == (1024, 1024, 3) and image.dtype == np.uint8


def test_the_same_example_looks_the_same_at_every_resolution():
  # Drawing is resolution independent: 256 px box-averaged to 64 px is close to
  # the 64 px rendering (only anti-aliasing and grain noise differ), and far
  # from other examples.
  idx = range(20)
  small = _images(ProceduralShapes(20, 64), idx).astype(np.float64)
  big = _area_down(_images(ProceduralShapes(20, 256), idx), 64)
  assert np.abs(big - small).mean() < 8
  assert np.abs(big - np.roll(small, 1, axis=0)).mean() > 30


@pytest.mark.parametrize("num_classes", [10, 37])
def test_labels_are_balanced_and_every_class_appears(num_classes):
  src = ProceduralShapes(3 * num_classes, 16, num_classes=num_classes)
  labels = np.array([src[i]["label"] for i in range(len(src))])
  np.testing.assert_array_equal(np.bincount(labels, minlength=num_classes), 3)


def test_classes_are_distinct_shape_colour_pairs():
  pairs = {class_shape_and_colour(c) for c in range(MAX_CLASSES)}
  assert len(pairs) == MAX_CLASSES == len(SHAPES) * len(COLOURS)
  assert len({class_shape_and_colour(c)[0] for c in range(10)}) == 10
  assert len({class_shape_and_colour(c)[1] for c in range(10)}) == 10


def test_classes_are_separable_by_a_nearest_centroid_classifier():
  # 8x8 box-averaged colour images; centroids from 100 examples per class,
  # accuracy on 200 held-out examples. Chance is 10%.
  src = ProceduralShapes(1200, 32, seed=0)
  feats = _area_down(_images(src, range(1200)), 8).reshape(1200, -1)
  labels = np.array([src[i]["label"] for i in range(1200)])
  train, test = slice(0, 1000), slice(1000, 1200)
  centroids = np.stack([feats[train][labels[train] == c].mean(0) for c in range(10)])
  dists = ((feats[test][:, None] - centroids[None]) ** 2).sum(-1)
  accuracy = (dists.argmin(1) == labels[test]).mean()
  assert accuracy > 0.85, accuracy


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_examples=0, image_size=32), "num_examples"),
    (dict(num_examples=10, image_size=4), "image_size"),
    (dict(num_examples=10, image_size=32.0), "image_size"),
    (dict(num_examples=10, image_size=32, seed=-1), "seed"),
    (dict(num_examples=10, image_size=32, num_classes=0), "num_classes"),
    (dict(num_examples=10, image_size=32, num_classes=MAX_CLASSES + 1), "num_classes"),
  ],
)
def test_bad_procedural_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ProceduralShapes(**kwargs)


def test_out_of_range_index_raises_index_error():
  src = ProceduralShapes(10, 16)
  for i in (10, -1):
    with pytest.raises(IndexError, match="out of range"):
      src[i]


# ----------------------------------------------------------------------------- pipeline


class _IndexSource:
  """Records whose label is their index, to follow the pipeline's order."""

  def __init__(self, n, size=4):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((self.size, self.size, 3), i % 256, np.uint8), "label": np.int32(i)}


def test_pipeline_yields_float_batches_in_minus_one_to_one():
  ds = make_dataset(ProceduralShapes(64, 16), batch_size=8, seed=0)
  batch = next(iter(ds))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  # uint8 0 / 255 map exactly to -1 / 1, as the official normalize_01_into_pm1.
  src = _IndexSource(256)
  images = np.concatenate([b["image"] for b in make_dataset(src, 64, seed=0, num_epochs=1)])
  assert images.min() == -1.0 and images.max() == 1.0


def test_one_epoch_visits_every_example_once_in_a_seeded_order():
  src = _IndexSource(40)
  run = lambda seed: np.concatenate([b["label"] for b in make_dataset(src, 8, seed=seed, num_epochs=1)])
  order = run(0)
  np.testing.assert_array_equal(np.sort(order), np.arange(40))
  assert not np.array_equal(order, np.arange(40))  # shuffled
  np.testing.assert_array_equal(order, run(0))  # deterministic
  assert not np.array_equal(order, run(1))


def test_epochs_are_reshuffled_and_unshuffled_keeps_order():
  src = _IndexSource(16)
  labels = np.concatenate([b["label"] for b in make_dataset(src, 8, seed=0, num_epochs=2)])
  first, second = labels[:16], labels[16:]
  np.testing.assert_array_equal(np.sort(first), np.sort(second))
  assert not np.array_equal(first, second)
  plain = np.concatenate([b["label"] for b in make_dataset(src, 4, seed=0, shuffle=False, num_epochs=1)])
  np.testing.assert_array_equal(plain, np.arange(16))


def test_shards_partition_the_data():
  src = _IndexSource(30)
  shards = [
    np.concatenate([b["label"] for b in make_dataset(src, 5, seed=0, num_epochs=1, shard_index=k, shard_count=3)])
    for k in range(3)
  ]
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(30))


def test_pipeline_resumes_from_iterator_state():
  ds = make_dataset(_IndexSource(50), 5, seed=0)
  it = iter(ds)
  next(it)
  state = it.get_state()
  expected = [next(it)["label"] for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(it2)["label"], want)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=20), "batch_size"),
    (dict(batch_size=2, num_epochs=0), "num_epochs"),
    (dict(batch_size=2, shard_index=3, shard_count=3), "shard_index"),
  ],
)
def test_bad_pipeline_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_dataset(_IndexSource(10), seed=0, **kwargs)


# ----------------------------------------------------------------------------- ImageFolder


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture
def image_root(tmp_path):
  solid = lambda rgb, h, w: np.broadcast_to(np.uint8(rgb), (h, w, 3)).copy()
  _write_png(tmp_path / "zebra" / "a.png", solid((200, 10, 10), 40, 40))
  _write_png(tmp_path / "zebra" / "nested" / "b.PNG", solid((200, 10, 10), 50, 30))
  # 64 wide x 32 high: red | green (middle 32 columns) | blue.
  bands = np.zeros((32, 64, 3), np.uint8)
  bands[:, :16] = (255, 0, 0)
  bands[:, 16:48] = (0, 255, 0)
  bands[:, 48:] = (0, 0, 255)
  _write_png(tmp_path / "apple" / "bands.png", bands)
  (tmp_path / "apple" / "notes.txt").write_text("not an image")
  return tmp_path


def test_image_folder_labels_classes_by_sorted_subfolder(image_root):
  src = ImageFolder(image_root, image_size=16)
  assert src.classes == ["apple", "zebra"] and len(src) == 3  # notes.txt ignored
  labels = [int(src[i]["label"]) for i in range(len(src))]
  assert labels == [0, 1, 1]
  for i in range(len(src)):
    assert src[i]["image"].shape == (16, 16, 3) and src[i]["image"].dtype == np.uint8
  np.testing.assert_allclose(src[1]["image"].reshape(-1, 3).mean(0), (200, 10, 10), atol=2)


def test_image_folder_center_crops_after_resizing_the_shorter_edge(image_root):
  # mid_reso 1: the 32 px short edge is already the target; the crop keeps the middle.
  src = ImageFolder(image_root, image_size=32, mid_reso=1.0)
  image = src[0]["image"]
  assert image.shape == (32, 32, 3)
  np.testing.assert_array_equal(image, np.broadcast_to(np.uint8((0, 255, 0)), (32, 32, 3)))


def test_image_folder_feeds_the_pipeline(image_root):
  batch = next(iter(make_dataset(ImageFolder(image_root, 8), 3, seed=0)))
  assert batch["image"].shape == (3, 8, 8, 3) and sorted(batch["label"]) == [0, 1, 1]


def test_corrupt_image_raises_an_error_naming_the_file(image_root):
  bad = image_root / "apple" / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
  src = ImageFolder(image_root, 16)
  index = [p for p, _ in src.samples].index(str(bad))
  with pytest.raises(CorruptImageError, match="broken.jpg"):
    src[index]
  with pytest.raises(CorruptImageError, match="broken.jpg"):
    src.verify()


def test_image_folder_without_classes_or_images_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    ImageFolder(tmp_path / "missing", 16)
  with pytest.raises(ValueError, match="no class subfolders"):
    ImageFolder(tmp_path, 16)
  (tmp_path / "cls").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    ImageFolder(tmp_path, 16)


# ----------------------------------------------------------------------------- tfds


def test_tfds_source_reports_an_unprepared_dataset(tmp_path):
  with pytest.raises(ValueError, match=r"'imagenet2012' is not prepared.*tfds build imagenet2012"):
    tfds_source("imagenet2012", "train", 64, data_dir=tmp_path)


def test_tfds_source_reports_an_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
    tfds_source("no_such_dataset_xyz", "train", 64, data_dir=tmp_path)


def test_tfds_records_are_preprocessed_like_image_folder_records():
  # The wrapper around a tfds random-access source, on in-memory records
  # (gray and RGB, as tfds decodes them).
  records = [
    {"image": np.full((40, 60, 1), 77, np.uint8), "label": 3},
    {"image": np.full((30, 20, 3), (1, 2, 3), np.uint8), "label": 999},
  ]
  src = TfdsSource(records, 16, 1.125, "image", "label", "fake")
  assert len(src) == 2
  for rec, label, rgb in zip((src[0], src[1]), (3, 999), ((77, 77, 77), (1, 2, 3))):
    assert rec["image"].shape == (16, 16, 3) and rec["label"] == label
    assert rec["label"].dtype == np.int32
    np.testing.assert_array_equal(rec["image"].reshape(-1, 3).mean(0), rgb)


def test_uncropped_folder_records_resize_the_shorter_edge_and_center_crop_to_the_eval_records(tmp_path):
  rng = np.random.default_rng(1)
  os.makedirs(tmp_path / "a")
  Image.fromarray(rng.integers(0, 255, (30, 50, 3), np.uint8)).save(tmp_path / "a" / "wide.png")
  Image.fromarray(rng.integers(0, 255, (44, 20, 3), np.uint8)).save(tmp_path / "a" / "tall.png")
  evaluation, uncropped = ImageFolder(tmp_path, 16), ImageFolder(tmp_path, 16, crop="none")
  for i, shape in ((0, (39, 18)), (1, (18, 30))):  # sorted files: tall.png, wide.png; short side round(1.125 * 16)
    image = uncropped[i]["image"]
    assert image.shape == shape + (3,)
    np.testing.assert_array_equal(
      image, np.asarray(Image.open(uncropped.samples[i][0]).resize(shape[::-1], Image.LANCZOS))
    )
    top, left = round((shape[0] - 16) / 2), round((shape[1] - 16) / 2)
    np.testing.assert_array_equal(image[top : top + 16, left : left + 16], evaluation[i]["image"])
