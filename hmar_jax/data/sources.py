"""Data sources for user images: an image-folder tree and TensorFlow Datasets.

Both follow grain's RandomAccessDataSource protocol (`len`, `source[i]`) and
yield the same records as ProceduralShapes: {'image': (S, S, 3) uint8,
'label': int32 ()}. Images are preprocessed as the official VAR/HMAR
evaluation transform does (utils/data.py build_dataset, val_aug): resize the
shorter edge to round(mid_reso * S) with Lanczos, then center-crop S x S.

With crop='none' they stop after the resize: records {'image': (H, W, 3) uint8}
with min(H, W) = round(mid_reso * S), for the training transform (train_aug:
the same resize, then a random S x S crop), whose crop the training loader
draws per position of the example stream (hmar_jax/data/augment.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# Lower-case file suffixes ImageFolder picks up (torchvision's IMG_EXTENSIONS
# minus formats PIL may not read everywhere).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What a source does after the resize: 'center' crops S x S (evaluation), 'none' leaves the crop
# to the training loader (a random S x S crop per position of the example stream).
CROPS = ("center", "none")


class CorruptImageError(ValueError):
  """An image file could not be decoded; the message names the file."""


def _check_image_size(image_size, mid_reso, who: str, crop: str = "center") -> tuple[int, float]:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ValueError(f"{who}: image_size must be a positive int, got {image_size!r}")
  if not mid_reso >= 1.0:
    raise ValueError(f"{who}: mid_reso must be >= 1 (resize then crop), got {mid_reso!r}")
  if crop not in CROPS:
    raise ValueError(f"{who}: crop must be one of {CROPS}, got {crop!r}")
  return int(image_size), float(mid_reso)


def resize_shorter_edge(image: Image.Image, image_size: int, mid_reso: float = 1.125) -> np.ndarray:
  """(H, W, 3) uint8 RGB with min(H, W) = round(mid_reso * image_size), aspect ratio kept.

  Mirrors torchvision Resize(int, LANCZOS), the first step of the official
  train_aug and val_aug (mid_reso 1.125 there too).
  """
  image = image.convert("RGB")
  w, h = image.size
  short = round(mid_reso * image_size)
  if w <= h:
    new_w, new_h = short, int(short * h / w)
  else:
    new_w, new_h = int(short * w / h), short
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.LANCZOS)
  return np.asarray(image, dtype=np.uint8)


def crop_at(image: np.ndarray, image_size: int, top: int, left: int) -> np.ndarray:
  """image[top : top + S, left : left + S] of an (H, W, C) array; a window outside it is a ValueError."""
  h, w = image.shape[:2]
  if not (0 <= top <= h - image_size and 0 <= left <= w - image_size):
    raise ValueError(f"a {image_size} x {image_size} crop at ({top}, {left}) does not fit a {h} x {w} image")
  return image[top : top + image_size, left : left + image_size]


def center_crop(image: np.ndarray, image_size: int) -> np.ndarray:
  """(S, S, C) center of an (H, W, C) array, placed as torchvision's CenterCrop places it."""
  h, w = image.shape[:2]
  return crop_at(image, image_size, int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0)))


def resize_and_center_crop(image: Image.Image, image_size: int, mid_reso: float = 1.125) -> np.ndarray:
  """(image_size, image_size, 3) uint8 RGB: shorter edge to round(mid_reso * image_size), center crop.

  Mirrors torchvision Resize(int, LANCZOS) + CenterCrop, the official evaluation transform.
  """
  return center_crop(resize_shorter_edge(image, image_size, mid_reso), image_size)


def _preprocess(image: Image.Image, image_size: int, mid_reso: float, crop: str) -> np.ndarray:
  resized = resize_shorter_edge(image, image_size, mid_reso)
  return center_crop(resized, image_size) if crop == "center" else resized


class ImageFolder:
  """Images in class subfolders: root/<class name>/<image file>.

  Classes are the sorted subfolder names (label = position in that order, as
  torchvision's ImageFolder/DatasetFolder assign them); files are the sorted
  image files (by suffix, case-insensitive) found recursively under each class
  folder. Decoding happens on access; a file PIL cannot decode raises
  CorruptImageError naming it (call `verify()` to check every file up front).

  Records: {'image': (image_size, image_size, 3) uint8, 'label': int32 ()}; with crop='none'
  the image is (H, W, 3), resized but not cropped (see the module docstring).
  """

  def __init__(
    self,
    root: str | os.PathLike,
    image_size: int,
    *,
    mid_reso: float = 1.125,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    crop: str = "center",
  ):
    self.image_size, self.mid_reso = _check_image_size(image_size, mid_reso, "ImageFolder", crop)
    self.crop = crop
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"ImageFolder: {self.root!r} is not a directory")
    self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
    if not self.classes:
      raise ValueError(f"ImageFolder: no class subfolders in {self.root!r}; expected root/<class name>/<image files>")
    exts = tuple(e.lower() for e in extensions)
    self.samples: list[tuple[str, int]] = []
    for label, name in enumerate(self.classes):
      for dirpath, _, filenames in sorted(os.walk(os.path.join(self.root, name))):
        self.samples.extend((os.path.join(dirpath, f), label) for f in sorted(filenames) if f.lower().endswith(exts))
    if not self.samples:
      raise ValueError(f"ImageFolder: no image files with suffixes {exts} under {self.root!r}")

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.samples)

  def load(self, path: str) -> np.ndarray:
    """Decodes and preprocesses one file; CorruptImageError names it on failure."""
    try:
      with Image.open(path) as image:
        image.load()
        return _preprocess(image, self.image_size, self.mid_reso, self.crop)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
      raise CorruptImageError(f"cannot read image file {path!r}: {e}") from e

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self.samples[int(index)]
    return {"image": self.load(path), "label": np.int32(label)}

  def verify(self) -> None:
    """Decodes every file once; raises CorruptImageError naming the first bad one."""
    for path, _ in self.samples:
      self.load(path)

  def __repr__(self) -> str:
    return (
      f"ImageFolder(root={self.root!r}, image_size={self.image_size}, crop={self.crop!r}, "
      f"num_classes={self.num_classes}, len={len(self)})"
    )


class TfdsSource:
  """Preprocessing wrapper around a tfds random-access data source (see tfds_source)."""

  def __init__(
    self, source, image_size: int, mid_reso: float, image_key: str, label_key: str, name: str, crop: str = "center"
  ):
    self._source = source
    self.image_size, self.mid_reso = _check_image_size(image_size, mid_reso, "TfdsSource", crop)
    self.crop = crop
    self.image_key, self.label_key, self.name = image_key, label_key, name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[int(index)]
    image = np.asarray(record[self.image_key])
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    pil = Image.fromarray(image.astype(np.uint8))
    return {
      "image": _preprocess(pil, self.image_size, self.mid_reso, self.crop),
      "label": np.int32(record[self.label_key]),
    }

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, len={len(self)}, image_size={self.image_size}, crop={self.crop!r})"


def tfds_source(
  name: str,
  split: str,
  image_size: int,
  *,
  data_dir: str | None = None,
  mid_reso: float = 1.125,
  image_key: str = "image",
  label_key: str = "label",
  crop: str = "center",
) -> TfdsSource:
  """A prepared TensorFlow Datasets dataset as a random-access (grain) source.

  For example ImageNet at 256 px, the official setting:

      src = tfds_source('imagenet2012', 'train', 256, data_dir='~/tensorflow_datasets')

  The dataset must already be prepared locally in a random-access format
  (nothing is downloaded here). For ImageNet, put ILSVRC2012_img_train.tar and
  ILSVRC2012_img_val.tar in <data_dir>/downloads/manual and run once:

      tfds build imagenet2012 --data_dir=<data_dir> --manual_dir=<dir with the tars> --file_format=array_record

  Reading needs only tensorflow-datasets and array-record (no TensorFlow).

  Args:
    name: tfds dataset name, optionally with version ('imagenet2012:5.1.0').
    split: split name, e.g. 'train', 'validation', 'train[:1%]'.
    image_size: output height = width.
    data_dir: tfds data directory (tfds' default when None).
    mid_reso, image_key, label_key: preprocessing and feature names.
    crop: 'center' (evaluation transform) or 'none' (resized only; see the module docstring).

  Returns:
    a source of {'image': (S, S, 3) uint8, 'label': int32 ()} records ((H, W, 3) with crop='none').

  Raises:
    ValueError: the dataset is unknown, not prepared, has no such split, or
      was prepared in a sequential-only format (tfrecord).
  """
  image_size, mid_reso = _check_image_size(image_size, mid_reso, "tfds_source", crop)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tfds_source needs tensorflow-datasets: pip install tensorflow-datasets array-record") from e
  if data_dir is not None:
    data_dir = os.path.expanduser(os.fspath(data_dir))
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names/versions.
    raise ValueError(f"tfds_source: unknown tfds dataset {name!r}: {str(e).splitlines()[0]}") from e
  if not builder.is_prepared():
    raise ValueError(
      f"tfds_source: tfds dataset {name!r} is not prepared in {builder.data_dir!r}. Prepare it "
      f"once (nothing is downloaded at run time): `tfds build {name.split(':')[0]} "
      f"--data_dir=<dir> --file_format=array_record` (ImageNet needs its tar files in "
      f"<dir>/downloads/manual), then pass data_dir=<dir>."
    )
  base_split = split.split("[")[0]
  if base_split not in builder.info.splits:
    raise ValueError(f"tfds_source: {name!r} has no split {base_split!r}; available: {sorted(builder.info.splits)}")
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise ValueError(
      f"tfds_source: {name!r} in {builder.data_dir!r} was prepared in a format without random "
      f"access; rebuild it with --file_format=array_record ({e})"
    ) from e
  return TfdsSource(source, image_size, mid_reso, image_key, label_key, name, crop)
