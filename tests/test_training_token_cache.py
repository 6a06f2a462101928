"""The token cache of the transformer tasks: keyed on the tokenizer's weights and the image files,
an unreadable image left out and counted instead of stopping the run; chunk files written one by one
(an interrupted build resumes), memory-mapped by the reader, the encoder split over local devices."""

import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from training_helpers import Interrupted, RecordingSource, nsp_config

from hmar_jax.data.loader import make_train_loader
from hmar_jax.data.procedural import ProceduralShapes
from hmar_jax.data.sources import ImageFolder
from hmar_jax.tokenizer.vqvae import load_vqvae, save_vqvae
from hmar_jax.training import token_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  first = token_cache.cached_tokens(config, str(tmp_path), vqvae).arrays()  # the weights saved in `path`
  # 'Retraining' in place: the same directory, the same architecture, other codebook vectors.
  retrained = nnx.clone(vqvae)
  codebook = retrained.quantizer.embedding.embedding
  codebook[...] = codebook[...][::-1]
  shutil.rmtree(path)
  save_vqvae(path, retrained)
  second = token_cache.cached_tokens(config, str(tmp_path), load_vqvae(path)).arrays()
  images = np.stack([r["image"] for r in (ImageFolder(tmp_path / "images", 16)[i] for i in range(8))])
  np.testing.assert_array_equal(second["indices"], _encode(retrained, images))
  assert not np.array_equal(second["indices"], first["indices"])


def test_an_image_added_to_the_folder_makes_a_new_cache(vqvae, tmp_path):
  _write_folder(tmp_path / "images")
  config = _folder_config("", tmp_path / "images")
  assert len(token_cache.cached_tokens(config, str(tmp_path), vqvae)) == 8
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "b" / "9.png")
  assert len(token_cache.cached_tokens(config, str(tmp_path), vqvae)) == 9


def test_an_unreadable_image_is_left_out_of_the_cache_and_counted(vqvae, tmp_path, caplog):
  _write_folder(tmp_path / "images")
  folder = ImageFolder(tmp_path / "images", 16)
  readable = [folder[i] for i in range(8) if i != 5]
  (tmp_path / "images" / "b" / "1.png").write_bytes(b"not a png")  # index 5: class b, second file
  config = _folder_config("", tmp_path / "images")
  with caplog.at_level(logging.WARNING):
    got = token_cache.cached_tokens(config, str(tmp_path), vqvae)
  assert got.unreadable == 1
  assert "1.png" in caplog.text and "1 of the 8 training images could not be read" in caplog.text
  arrays = got.arrays()
  np.testing.assert_array_equal(arrays["indices"], _encode(vqvae, np.stack([r["image"] for r in readable])))
  np.testing.assert_array_equal(arrays["labels"], [r["label"] for r in readable])
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again = token_cache.cached_tokens(config, str(tmp_path), vqvae)  # from the cache file
  assert again.unreadable == 1 and "1 of the 8 training images could not be read" in caplog.text


# ----------------------------------------------------------------------------- chunked, resumable cache


def _build(directory, vqvae, source, **kwargs):
  return token_cache.build_cache(
    str(directory), "ab" * 32, source, vqvae, num_images=10, chunk_size=4, batch_size=3, show_progress=False, **kwargs
  )


def test_an_interrupted_build_resumes_by_tokenising_only_the_missing_chunks(vqvae, tmp_path):
  images = ProceduralShapes(10, vqvae.image_size, seed=3)
  reference = _build(tmp_path / "uninterrupted", vqvae, images).arrays()
  with pytest.raises(Interrupted):
    _build(tmp_path / "cache", vqvae, RecordingSource(images, stop_at=9))  # chunks [0, 4), [4, 8) done; [8, 10) not
  assert token_cache.TokenCacheSource.open(str(tmp_path / "cache"), "ab" * 32) is None  # no manifest: incomplete
  resumed_source = RecordingSource(images)
  resumed = _build(tmp_path / "cache", vqvae, resumed_source).arrays()
  assert resumed_source.read == {8, 9}
  for name in ("indices", "labels", "positions"):
    np.testing.assert_array_equal(resumed[name], reference[name])


def test_cached_tokens_are_the_encoder_tokens_of_the_center_crops_stored_as_uint16(vqvae, tmp_path):
  images = ProceduralShapes(10, vqvae.image_size, seed=3)
  cache = _build(tmp_path, vqvae, images)
  want = _encode(vqvae, np.stack([images[i]["image"] for i in range(10)]))
  np.testing.assert_array_equal(np.stack([cache[i]["indices"] for i in range(10)]), want)
  assert [int(cache[i]["labels"]) for i in range(10)] == [int(images[i]["label"]) for i in range(10)]
  assert cache[3]["indices"].dtype == np.int32
  chunks = [np.load(tmp_path / f, mmap_mode="r") for f in sorted(os.listdir(tmp_path)) if f.endswith(".npy")]
  assert len(chunks) == 3 and all(c.dtype["tokens"].base == np.uint16 for c in chunks)


def test_a_vocabulary_beyond_uint16_is_stored_as_int32():
  assert token_cache.token_dtype(65536) == np.uint16
  assert token_cache.token_dtype(65537) == np.int32


def test_the_cache_reader_maps_the_chunk_files_instead_of_holding_the_tokens(vqvae, tmp_path):
  cache = _build(tmp_path, vqvae, ProceduralShapes(10, vqvae.image_size, seed=3))
  first = cache[9]["indices"]
  copy = pickle.loads(pickle.dumps(cache))  # what a loader worker process receives
  stored = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".npy"))
  assert len(pickle.dumps(cache)) < stored / 4  # the tokens do not travel with it
  np.testing.assert_array_equal(copy[9]["indices"], first)
  batch = next(iter(make_train_loader(copy, global_batch=10, seed=0, num_threads=2)))
  np.testing.assert_array_equal(np.sort(batch["labels"]), np.sort(cache.arrays()["labels"]))


def test_a_cache_built_for_another_key_is_rebuilt_and_its_chunks_removed(vqvae, tmp_path):
  images = ProceduralShapes(10, vqvae.image_size, seed=3)
  _build(tmp_path, vqvae, images)
  source = RecordingSource(images)
  token_cache.build_cache(
    str(tmp_path), "cd" * 32, source, vqvae, num_images=10, chunk_size=4, batch_size=3, show_progress=False
  )
  assert source.read == set(range(10))
  assert token_cache.TokenCacheSource.open(str(tmp_path), "ab" * 32) is None
  assert not [f for f in os.listdir(tmp_path) if f.startswith("abab")]


ENCODE_ON_FOUR_DEVICES = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  import numpy as np
  from hmar_jax.tokenizer.vqvae import load_vqvae
  from hmar_jax.training.token_cache import ShardedEncoder
  encoder = ShardedEncoder(load_vqvae(sys.argv[1]), batch_size=6)
  images = np.load(sys.argv[2])
  tokens = encoder(images)
  print("DEVICES", len(encoder.mesh.devices.flat), "BATCH", encoder.batch_size)
  np.save(sys.argv[3], tokens)
""")


def test_the_encoder_splits_each_batch_over_the_local_devices(vqvae, tmp_path):
  save_vqvae(str(tmp_path / "tokenizer"), vqvae)
  images = np.stack([ProceduralShapes(5, vqvae.image_size, seed=1)[i]["image"] for i in range(5)])
  np.save(tmp_path / "images.npy", images)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
    [
      sys.executable,
      "-c",
      ENCODE_ON_FOUR_DEVICES,
      str(tmp_path / "tokenizer"),
      str(tmp_path / "images.npy"),
      str(tmp_path / "tokens.npy"),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "DEVICES 4 BATCH 8" in done.stdout  # 6 rounded up to a multiple of the 4 devices
  np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), _encode(vqvae, images))
