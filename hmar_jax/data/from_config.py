"""The image sources of a training config's `data` section: one code path for procedural, folder and tfds."""

from __future__ import annotations

import ml_collections

from hmar_jax.data.augment import RandomCrop
from hmar_jax.data.loader import SkipUnreadable
from hmar_jax.data.procedural import ProceduralShapes
from hmar_jax.data.sources import ImageFolder, tfds_source


def image_source(data: ml_collections.ConfigDict, image_size: int, *, crop: str = "center"):
  """The grain source of config.data: procedural (built in, always S x S), folder or tfds.

  crop: 'center' gives {'image': (S, S, 3) uint8, 'label': int32 ()} records (the evaluation
  transform); 'none' leaves folder / tfds images resized but uncropped (for RandomCrop).
  """
  size = int(image_size)
  if data.source == "procedural":
    return ProceduralShapes(int(data.num_examples), size, seed=int(data.seed), num_classes=int(data.num_classes))
  if data.source == "folder":
    return ImageFolder(data.path, size, crop=crop)
  return tfds_source(data.name, data.split, size, data_dir=data.data_dir or None, crop=crop)


def train_image_source(data: ml_collections.ConfigDict, image_size: int):
  """The training images of config.data with the transform config.data.augment names.

  random_crop: records are resized only and make_train_loader crops them (RandomCrop); center_crop:
  the evaluation transform. Unreadable images are skipped and counted (SkipUnreadable).
  """
  if data.augment == "random_crop":
    return RandomCrop(SkipUnreadable(image_source(data, image_size, crop="none")), int(image_size))
  return SkipUnreadable(image_source(data, image_size, crop="center"))
