"""The training transform: a random S x S crop of each image, drawn per position of the example stream.

The official VAR/HMAR training augmentation (utils/data.py, train_aug) resizes the shorter edge to
round(1.125 * S) with Lanczos, then takes a random S x S crop (no flip); evaluation takes the center
crop instead (val_aug). Sources do the resize (crop='none', hmar_jax/data/sources.py); `RandomCrop`
wraps such a source and names the crop as its `random_augment(record, rng)`, which
make_train_loader applies to the shuffled, repeated example stream (grain `random_map`). Its
generator is seeded by (seed, position in that stream), so:

* a run resumed at any step, and a run over any number of processes, see the same crops;
* each epoch draws new crops of the same image (its positions differ from epoch to epoch).

Images already S x S (the procedural data) pass through unchanged: their only crop is the whole image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hmar_jax.data.sources import crop_at

# config.data.augment: the training transform ('random_crop', official) or the evaluation one.
AUGMENTATIONS = ("random_crop", "center_crop")


def random_crop(image: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """(S, S, C) window of an (H, W, C) image at a uniformly drawn offset (torchvision RandomCrop's draw)."""
  h, w = image.shape[:2]
  if h < image_size or w < image_size:
    raise ValueError(f"cannot crop {image_size} x {image_size} from a {h} x {w} image")
  top = int(rng.integers(0, h - image_size + 1))
  left = int(rng.integers(0, w - image_size + 1))
  return crop_at(image, image_size, top, left)


class RandomCrop:
  """A source whose training records get a random S x S crop in the loader.

  `source[i]` returns the wrapped record unchanged (image (H, W, 3) with min(H, W) >= S);
  `random_augment(record, rng)` returns it with the image cropped to (S, S, 3). make_train_loader
  calls it on each position of the repeated stream with a generator seeded by that position.
  """

  def __init__(self, source, image_size: int):
    self._source = source
    self.image_size = int(image_size)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[index]

  def random_augment(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    record = dict(record)
    record["image"] = random_crop(np.asarray(record["image"]), self.image_size, rng)
    return record

  def __repr__(self) -> str:
    return f"RandomCrop({self._source!r}, image_size={self.image_size})"
