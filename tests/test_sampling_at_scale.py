"""Sampling at scale: batches written once, resumed without duplicates, the same images on any device count."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from sampling_helpers import tiny_hmar_sampler, tiny_transformer, tiny_vqvae

from hmar_jax.sampling import Sampler
from hmar_jax.sampling.at_scale import batch_path, class_labels, sample_to_dir

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

SETTINGS = dict(cfg=1.0, top_k=0, top_p=0.0)


def assert_same_images(got, want):
  """The same tokens decoded on another device count: the decoder's float sums may split differently
  over devices, so a pixel sitting on a rounding boundary may move by one level (one in 6144 seen on
  CPU), but a token drawn differently would change a whole patch by far more."""
  assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
  diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
  assert diff.max() <= 1, f"pixels differ by up to {diff.max()} levels"
  assert np.count_nonzero(diff) <= max(1, diff.size // 1000), f"{np.count_nonzero(diff)} of {diff.size} pixels differ"


@pytest.fixture(scope="module")
def sampler():
  return tiny_hmar_sampler()


@pytest.fixture(scope="module")
def first_run(sampler, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("run"))
  labels = class_labels([2, 5, 7], 3)  # 9 images in 3 batches of 4 (the last one padded)
  path = sample_to_dir(sampler, out, labels, batch_size=4, seed=3, show_progress=False, **SETTINGS)
  return out, labels, path


def test_the_joined_file_holds_every_image_in_class_order_as_the_evaluator_reads_it(first_run):
  out, labels, path = first_run
  with np.load(path) as f:
    images, got_labels = f["arr_0"], f["labels"]
  assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == 9 and images.shape[-1] == 3
  assert os.path.basename(path) == f"samples_{'x'.join(map(str, images.shape))}.npz"
  np.testing.assert_array_equal(got_labels, labels)
  assert len(np.unique(images.reshape(9, -1), axis=0)) == 9  # nine different images
  assert np.asarray(Image.open(os.path.join(out, "grid.png"))).ndim == 3


def test_a_rerun_draws_only_the_missing_batches_and_gives_the_same_images(first_run, sampler, monkeypatch):
  out, labels, path = first_run
  with np.load(path) as f:
    before = f["arr_0"]
  os.remove(batch_path(out, 1))  # as if the run had stopped before writing batch 1
  drawn = []
  original = Sampler.sample
  monkeypatch.setattr(Sampler, "sample", lambda self, *a, **k: drawn.append(1) or original(self, *a, **k))
  again = sample_to_dir(sampler, out, labels, batch_size=4, seed=3, show_progress=False, **SETTINGS)
  assert len(drawn) == 1
  with np.load(again) as f:
    np.testing.assert_array_equal(f["arr_0"], before)


def test_a_rerun_with_other_settings_is_refused_naming_them(first_run, sampler):
  out, labels, _ = first_run
  with pytest.raises(ValueError, match="seed"):
    sample_to_dir(sampler, out, labels, batch_size=4, seed=4, show_progress=False, **SETTINGS)


def test_a_batch_size_the_local_devices_do_not_divide_is_refused(sampler, tmp_path):
  with pytest.raises(ValueError, match="batch_size"):
    sample_to_dir(sampler, str(tmp_path), class_labels([0], 2), batch_size=0, seed=0, show_progress=False)


def test_the_same_seed_gives_the_same_images_on_four_devices(first_run, tmp_path):
  out, labels, path = first_run
  script = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {TESTS!r})
    import jax
    from sampling_helpers import tiny_hmar_sampler
    from hmar_jax.sampling.at_scale import class_labels, sample_to_dir
    assert len(jax.local_devices()) == 4
    print(sample_to_dir(tiny_hmar_sampler(), {str(tmp_path)!r}, class_labels([2, 5, 7], 3), batch_size=4,
                        seed=3, show_progress=False, **{SETTINGS!r}))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(result.stdout.strip().splitlines()[-1]) as f, np.load(path) as g:
    assert_same_images(f["arr_0"], g["arr_0"])


def test_a_var_kv_cache_lives_split_over_four_devices_and_gives_one_device_images(tmp_path):
  """Each device makes its own rows of the KV cache (a whole cache made on one device first would
  need the global batch's cache there), and the images match one device's."""
  labels = class_labels([1, 4], 4)
  var = Sampler(tiny_transformer("var", 2), tiny_vqvae(0))
  want = sample_to_dir(var, str(tmp_path / "one"), labels, batch_size=8, seed=1, show_progress=False, **SETTINGS)
  script = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {TESTS!r})
    import jax
    from sampling_helpers import tiny_transformer, tiny_vqvae
    from hmar_jax.sampling import Sampler
    from hmar_jax.sampling.at_scale import class_labels, sample_to_dir
    sampler = Sampler(tiny_transformer("var", 2), tiny_vqvae(0))
    made = sampler._empty_cache
    rows = []
    def recording(batch, labels):
      cache = made(batch, labels)
      concrete = [a for a in jax.tree.leaves(cache) if not isinstance(a, jax.core.Tracer)]  # not precompile's
      rows.extend(a.sharding.shard_shape(a.shape)[0] for a in concrete)
      return cache
    sampler._empty_cache = recording
    path = sample_to_dir(sampler, {str(tmp_path / "four")!r}, class_labels([1, 4], 4), batch_size=8, seed=1,
                         show_progress=False, **{SETTINGS!r})
    print(sorted(set(rows)))
    print(path)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  shard_rows, path = result.stdout.strip().splitlines()[-2:]
  assert shard_rows == "[4]"  # 2 x 8 guided rows over 4 devices
  with np.load(path) as f, np.load(want) as g:
    assert_same_images(f["arr_0"], g["arr_0"])
