"""The evaluator's InceptionV3: preprocessing, output shapes, sharded batched extraction and its cache."""

import jax
import numpy as np
import pytest
from flax import nnx

from hmar_jax.evaluation import features
from hmar_jax.evaluation.batches import open_image_batch
from hmar_jax.evaluation.convert import zeros_inception
from hmar_jax.evaluation.inception import preprocess


@pytest.fixture(scope="module")
def model():
  """Random weights (fast: filled leaf by leaf, not through the eager initialisers)."""
  m = zeros_inception()
  rng = np.random.default_rng(0)
  graphdef, state = nnx.split(m)

  def fill(path, x):
    name = str(path[-1])
    if name == "kernel" or name == "fc":
      fan_in = int(np.prod(x.shape[:-1]))
      return rng.standard_normal(x.shape, np.float32) * np.float32((2.0 / fan_in) ** 0.5)
    if name == "var":
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if name == "scale":
      return np.ones(x.shape, np.float32)
    return rng.standard_normal(x.shape, np.float32) * np.float32(0.1)

  flat = [(p, v.replace(jax.numpy.asarray(fill(p, v.get_value())))) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_preprocessing_maps_0_128_255_to_minus_one_zero_and_127_over_128():
  img = np.zeros((1, 299, 299, 3), np.uint8)
  img[0, 0, 0] = [0, 128, 255]
  np.testing.assert_allclose(np.asarray(preprocess(img))[0, 0, 0], [-1.0, 0.0, 127 / 128])


def test_outputs_have_the_evaluator_shapes_at_299(model):
  img = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 3)).astype(np.uint8)
  (pool, mixed_6), out = nnx.jit(lambda m, x: (m.features(preprocess(x)), m(x)))(model, img)
  assert pool.shape == (1, 2048) and mixed_6.shape == (1, 17, 17, 192)
  assert out["logits"].shape == (1, 1008) and out["pool_3"].shape == (1, 2048)
  # sFID's features: mixed_6/conv's first 7 channels, flattened row, column, channel.
  np.testing.assert_array_equal(np.asarray(out["spatial"]), np.asarray(mixed_6)[..., :7].reshape(1, 17 * 17 * 7))
  np.testing.assert_allclose(
    np.asarray(out["logits"]), np.asarray(pool) @ np.asarray(model.fc[...]), rtol=1e-4, atol=1e-4
  )


def _npz(path, images):
  np.savez(path, arr_0=images)
  return open_image_batch(path, "samples file")


def test_sharded_batches_with_padding_match_one_forward_each_and_are_cached(model, tmp_path):
  images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  batch = _npz(tmp_path / "s.npz", images)
  extractor = features.FeatureExtractor(model, batch_size=2, devices=jax.local_devices())
  pool, spatial = features.batch_features(batch, extractor, "w", str(tmp_path / "cache"))
  assert pool.shape == (3, 2048) and spatial.shape == (3, 2023)
  one_pool, one_spatial = extractor.run(images[2:])  # the last, padded batch alone
  np.testing.assert_allclose(pool[2:], one_pool, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(spatial[2:], one_spatial, rtol=1e-5, atol=1e-5)

  def no_network(*args, **kwargs):
    raise AssertionError("features were recomputed despite the cache")

  extractor.extract = no_network
  cached_pool, cached_spatial = features.batch_features(batch, extractor, "w", str(tmp_path / "cache"))
  np.testing.assert_array_equal(cached_pool, pool)
  np.testing.assert_array_equal(cached_spatial, spatial)


def test_the_cache_is_keyed_on_the_file_content_and_the_weights():
  assert features.cache_key("a", "w") != features.cache_key("b", "w")
  assert features.cache_key("a", "w") != features.cache_key("a", "v")
