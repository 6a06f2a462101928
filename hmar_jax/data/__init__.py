"""Data: the built-in procedural dataset, user image sources, and the grain pipeline.

source = ProceduralShapes(num_examples=50_000, image_size=256, seed=0)   # no download
source = ImageFolder('/data/my_images/train', image_size=256)             # root/<class>/<img>
source = tfds_source('imagenet2012', 'train', 256, data_dir='/data/tfds')  # prepared locally
for batch in make_dataset(source, batch_size=64, seed=0):
  batch['image']  # (64, 256, 256, 3) float32 in [-1, 1]
  batch['label']  # (64,) int32
"""

from hmar_jax.data.augment import AUGMENTATIONS, RandomCrop, random_crop
from hmar_jax.data.pipeline import make_dataset, to_model_batch
from hmar_jax.data.procedural import ProceduralShapes, class_shape_and_colour, render
from hmar_jax.data.sources import CorruptImageError, ImageFolder, resize_and_center_crop, tfds_source

__all__ = [
  "AUGMENTATIONS",
  "RandomCrop",
  "random_crop",
  "ProceduralShapes",
  "render",
  "class_shape_and_colour",
  "ImageFolder",
  "CorruptImageError",
  "resize_and_center_crop",
  "tfds_source",
  "make_dataset",
  "to_model_batch",
]
