"""The latent cache of MAR / Hi-MAR training: the KL VAE's moments of each centre crop and of its flip
(Hi-MAR: also of the low-resolution view), read by a step that draws the same tokens as encoding every
step; resumable; a directory holding anything else refused with an error naming the difference."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import training_helpers as th
from flax import nnx

from hmar_jax import cache_latents
from hmar_jax.data.procedural import ProceduralShapes
from hmar_jax.training import latent_cache, schema
from hmar_jax.training.tasks.mar import load_tokenizer
from hmar_jax.training.trainer import make_task, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the tiny KL VAE of training_helpers: 16 px -> 4 x 4 latents of 16 channels (moments: 32)


@pytest.fixture(scope="module")
def vae():
  """The tiny KL VAE with random weights."""
  return load_tokenizer(th.mar_config())


@nnx.jit
def _encode(vae, x):
  return vae.encode(x)


def _images(source, n):
  return np.stack([source[i]["image"] for i in range(n)])


def _unit(u8):
  """uint8 images -> float32 in [-1, 1], as the training step sees them."""
  return u8.astype(np.float32) * (2.0 / 255.0) - 1.0


def _build(directory, vae, source, low_res_px=0):
  return latent_cache.build_latents(
    str(directory),
    "ab" * 32,
    source,
    vae,
    num_images=10,
    low_res_px=low_res_px,
    chunk_size=4,
    batch_size=3,
    show_progress=False,
  )


# ----------------------------------------------------------------------------- what is stored


def test_the_cache_holds_the_encoder_moments_of_each_centre_crop_and_of_its_flip(vae, tmp_path):
  images = ProceduralShapes(10, SIZE, seed=3)
  got = _build(tmp_path, vae, images).arrays()
  x = _unit(_images(images, 10))
  np.testing.assert_allclose(got["moments"], np.asarray(_encode(vae, x)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["moments_flip"], np.asarray(_encode(vae, x[:, :, ::-1])), rtol=1e-5, atol=1e-5)
  assert got["moments"].dtype == np.float32 and got["moments"].shape == (10, 4, 4, 32)
  np.testing.assert_array_equal(got["label"], [images[i]["label"] for i in range(10)])


def test_the_hi_mar_cache_also_holds_the_moments_of_the_downsampled_crop_and_of_its_flip(vae, tmp_path):
  images = ProceduralShapes(10, SIZE, seed=3)
  got = _build(tmp_path, vae, images, low_res_px=8).arrays()
  x = _unit(_images(images, 10))
  # The official low view: torch's bicubic F.interpolate (no antialiasing), 16 px -> 8 px.
  nchw = torch.nn.functional.interpolate(
    torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), size=(8, 8), mode="bicubic"
  )
  half = nchw.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got["low_moments"], np.asarray(_encode(vae, half)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["low_moments_flip"], np.asarray(_encode(vae, half[:, :, ::-1])), rtol=1e-5, atol=1e-5)
  assert got["low_moments"].shape == (10, 2, 2, 32)


def test_an_interrupted_build_resumes_by_encoding_only_the_missing_chunks(vae, tmp_path):
  images = ProceduralShapes(10, SIZE, seed=3)
  reference = _build(tmp_path / "uninterrupted", vae, images).arrays()
  with pytest.raises(th.Interrupted):
    _build(tmp_path / "cache", vae, th.RecordingSource(images, stop_at=9))  # chunks [0, 4), [4, 8) done; [8, 10) not
  assert latent_cache.LatentCacheSource.open(str(tmp_path / "cache"), "ab" * 32) is None  # no manifest yet
  resumed_source = th.RecordingSource(images)
  resumed = _build(tmp_path / "cache", vae, resumed_source).arrays()
  assert resumed_source.read == {8, 9}
  for name in ("moments", "moments_flip", "label", "position"):
    np.testing.assert_array_equal(resumed[name], reference[name])


# ----------------------------------------------------------------------------- the training step


def _cached_config(directory, make=th.mar_config, seed=0):
  c = make(examples=8)
  c.data.latents_cache = str(directory)
  c.tokenizer.seed = seed
  return c


@pytest.fixture(scope="module")
def mar_cache(tmp_path_factory):
  """The tiny MAR's latent cache of 8 built-in images, built by the cache command: (config, workdir, cache)."""
  workdir = tmp_path_factory.mktemp("mar_cache")
  config = _cached_config("auto")
  return config, workdir, cache_latents.build(config, str(workdir))


def _batches(plain, cached_source):
  """(frozen, the image batch, the cached batch) of the first 8 built-in images, prepared for the step."""
  source = ProceduralShapes(8, SIZE)
  images = {"image": jnp.asarray(_images(source, 8)), "label": jnp.asarray([source[i]["label"] for i in range(8)])}
  records = [cached_source[i] for i in range(8)]
  moments = {k: jnp.asarray(np.stack([r[k] for r in records])) for k in records[0]}
  frozen = {"vae": jax.tree.map(jnp.asarray, plain._vae_host)}
  return frozen, plain.prepare_batch(images, frozen), moments


def _mixed_flips(task, k_flip):
  flips = np.asarray(task.flips(k_flip, 8))
  assert 0 < flips.sum() < 8, "the key should flip some examples and not others"


def test_the_step_draws_from_the_cache_the_tokens_it_draws_encoding_every_step(mar_cache, tmp_path):
  config, workdir, cache = mar_cache
  plain = make_task(th.mar_config(examples=8), str(tmp_path))
  cached = make_task(config, str(workdir))
  frozen, image_batch, cache_batch = _batches(plain, cache)
  k_flip, k_vae = jax.random.split(jax.random.key(0))
  _mixed_flips(plain, k_flip)
  want = jax.jit(plain.batch_tokens)(frozen, image_batch, k_flip, k_vae)
  got = jax.jit(cached.batch_tokens)(frozen, cached.prepare_batch(cache_batch, frozen), k_flip, k_vae)
  assert got.shape == want.shape == (8, 16, 16)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_hi_mar_draws_both_views_from_the_cache_as_it_draws_them_encoding_every_step(tmp_path):
  plain = make_task(th.himar_config(examples=8), str(tmp_path / "plain"))
  cached = make_task(_cached_config("auto", th.himar_config), str(tmp_path / "cached"))
  frozen, image_batch, cache_batch = _batches(plain, cached.train_source())
  assert cached.example_shapes() == {
    "moments": (4, 4, 32),
    "moments_flip": (4, 4, 32),
    "low_moments": (2, 2, 32),
    "low_moments_flip": (2, 2, 32),
    "label": (),
  }
  k_flip, k_high, k_low = jax.random.split(jax.random.key(0), 3)
  _mixed_flips(plain, k_flip)
  want = jax.jit(plain.batch_views)(frozen, image_batch, k_flip, k_high, k_low)
  got = jax.jit(cached.batch_views)(frozen, cached.prepare_batch(cache_batch, frozen), k_flip, k_high, k_low)
  for name, g, w in zip(("high", "low"), got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_tiny_mar_trains_from_the_cache_with_finite_losses(tmp_path):
  c = th.mar_config(steps=2, examples=16)
  c.data.latents_cache = "auto"
  train(c, str(tmp_path))
  losses = [row["loss"] for row in th.read_jsonl(tmp_path / "metrics.jsonl")]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert len(latent_cache.LatentCacheSource.open(str(tmp_path / "latents"))) == 16


# ----------------------------------------------------------------------------- building ahead


def test_the_cache_command_builds_the_cache_training_then_reads(mar_cache, monkeypatch):
  config, workdir, built = mar_cache
  assert built.directory == str(workdir / "latents") and len(built) == 8

  def no_rebuild(*args, **kwargs):
    raise AssertionError("training encoded the images again")

  monkeypatch.setattr(latent_cache, "build_latents", no_rebuild)
  read = make_task(config, str(workdir)).train_source()
  assert read.key == built.key and len(read) == 8


def test_the_cache_command_refuses_a_config_without_a_cache(tmp_path):
  done = subprocess.run(
    [sys.executable, "-m", "hmar_jax.cache_latents", "--config=configs/mar.py:tiny", f"--workdir={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 2, done.stderr[-2000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ValueError: config.data.latents_cache is '' (encode every step): set it to 'auto'")


# ----------------------------------------------------------------------------- bad directories


def _files(directory):
  return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_a_latents_cache_naming_a_file_is_refused_by_the_config_check(tmp_path):
  (tmp_path / "latents.npz").write_bytes(b"")
  with pytest.raises(schema.ConfigError, match=r"latents_cache .*latents.npz' is a file; the latent cache is a dir"):
    schema.validate(_cached_config(tmp_path / "latents.npz"))


def test_the_cache_is_refused_with_a_random_crop_augmentation():
  c = _cached_config("auto")
  c.data.augment = "random_crop"
  with pytest.raises(schema.ConfigError, match=r"centre crop .*augment is 'random_crop'"):
    schema.validate(c)


def test_a_cache_made_by_another_vae_is_refused_naming_it_and_kept(mar_cache):
  _, workdir, _ = mar_cache
  before = _files(workdir / "latents")
  other = make_task(_cached_config("auto", seed=1), str(workdir))
  with pytest.raises(ValueError, match=r"latents' was made by another VAE \(encoder fingerprint"):
    other.train_source()
  assert _files(workdir / "latents") == before


def test_a_hi_mar_run_refuses_a_mar_cache_naming_the_views_it_lacks(mar_cache):
  _, workdir, _ = mar_cache
  himar = make_task(_cached_config("auto", th.himar_config), str(workdir))
  with pytest.raises(ValueError, match=r"holds the views .*moments_flip.*, this run needs .*low_moments"):
    himar.train_source()


def test_a_token_cache_directory_is_refused_as_a_latent_cache(tmp_path):
  directory = tmp_path / "tokens"
  directory.mkdir()
  (directory / "manifest.json").write_text(json.dumps({"format": 2, "key": "ab" * 32, "chunks": []}))
  with pytest.raises(ValueError, match=r"tokens' is a token cache .*, not a latent cache"):
    make_task(_cached_config(directory), str(tmp_path)).train_source()


def test_a_directory_of_other_files_is_refused_and_left_alone(tmp_path):
  directory = tmp_path / "images"
  directory.mkdir()
  (directory / "photo.png").write_bytes(b"png")
  with pytest.raises(ValueError, match=r"holds files that are not a latent cache's \(photo.png\)"):
    make_task(_cached_config(directory), str(tmp_path)).train_source()
  assert _files(directory) == {"photo.png": b"png"}
