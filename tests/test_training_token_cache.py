"""The token cache of the transformer tasks: keyed on the tokenizer's weights and the image files,
and an unreadable image is left out and counted instead of stopping the run."""

import logging
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from training_helpers import nsp_config

from hmar_jax.data.sources import ImageFolder
from hmar_jax.tokenizer.vqvae import load_vqvae, save_vqvae
from hmar_jax.training import token_cache


@nnx.jit
def _encode_maps(vqvae, x):
  return vqvae.encode_indices(x)


def _encode(vqvae, images_u8):
  """Flat token maps (N, L) of uint8 images, from the tokenizer's encoder, batched here in one call."""
  x = images_u8.astype(np.float32) * (2.0 / 255.0) - 1.0
  return np.concatenate([np.asarray(m).reshape(len(x), -1) for m in _encode_maps(vqvae, x)], axis=1)


def _write_folder(root, n_per_class=4, seed=0):
  rng = np.random.default_rng(seed)
  for cls in ("a", "b"):
    os.makedirs(root / cls, exist_ok=True)
    for i in range(n_per_class):
      Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(root / cls / f"{i}.png")


@pytest.fixture(scope="module")
def vqvae():
  """The tiny tokenizer with random weights."""
  return token_cache.load_tokenizer(nsp_config("hmar", examples=8))


def _folder_config(tokenizer_path, images):
  config = nsp_config("hmar", examples=8)
  config.tokenizer.checkpoint = tokenizer_path
  config.data.source = "folder"
  config.data.path = str(images)
  config.data.num_examples = 0  # every image of the folder
  config.data.tokenize_batch_size = 4
  return config


def test_a_tokenizer_retrained_in_place_makes_a_new_cache(vqvae, tmp_path):
  path = str(tmp_path / "tokenizer")
  save_vqvae(path, vqvae)
  _write_folder(tmp_path / "images")
  config = _folder_config(path, tmp_path / "images")
  first = token_cache.cached_tokens(config, str(tmp_path), vqvae)  # the weights saved in `path`
  # 'Retraining' in place: the same directory, the same architecture, other codebook vectors.
  retrained = nnx.clone(vqvae)
  codebook = retrained.quantizer.embedding.embedding
  codebook[...] = codebook[...][::-1]
  shutil.rmtree(path)
  save_vqvae(path, retrained)
  second = token_cache.cached_tokens(config, str(tmp_path), load_vqvae(path))
  images = np.stack([r["image"] for r in (ImageFolder(tmp_path / "images", 16)[i] for i in range(8))])
  np.testing.assert_array_equal(second["indices"], _encode(retrained, images))
  assert not np.array_equal(second["indices"], first["indices"])


def test_an_image_added_to_the_folder_makes_a_new_cache(vqvae, tmp_path):
  _write_folder(tmp_path / "images")
  config = _folder_config("", tmp_path / "images")
  assert len(token_cache.cached_tokens(config, str(tmp_path), vqvae)["labels"]) == 8
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "b" / "9.png")
  assert len(token_cache.cached_tokens(config, str(tmp_path), vqvae)["labels"]) == 9


def test_an_unreadable_image_is_left_out_of_the_cache_and_counted(vqvae, tmp_path, caplog):
  _write_folder(tmp_path / "images")
  folder = ImageFolder(tmp_path / "images", 16)
  readable = [folder[i] for i in range(8) if i != 5]
  (tmp_path / "images" / "b" / "1.png").write_bytes(b"not a png")  # index 5: class b, second file
  config = _folder_config("", tmp_path / "images")
  with caplog.at_level(logging.WARNING):
    got = token_cache.cached_tokens(config, str(tmp_path), vqvae)
  assert got["unreadable"] == 1
  assert "1.png" in caplog.text and "1 of the 8 training images could not be read" in caplog.text
  np.testing.assert_array_equal(got["indices"], _encode(vqvae, np.stack([r["image"] for r in readable])))
  np.testing.assert_array_equal(got["labels"], [r["label"] for r in readable])
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again = token_cache.cached_tokens(config, str(tmp_path), vqvae)  # from the cache file
  assert again["unreadable"] == 1 and "1 of the 8 training images could not be read" in caplog.text
