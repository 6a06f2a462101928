"""Bad inputs to `python -m hmar_jax.evaluate` end in one clear error before any model work."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hmar_jax.evaluation.batches import open_image_batch, reference_statistics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n=5, size=8):
  return np.zeros((n, size, size, 3), np.uint8)


def test_a_missing_reference_batch_ends_in_one_error_line_with_status_2(tmp_path):
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=_images())
  weights = tmp_path / "weights.pb"
  weights.write_bytes(b"")
  cmd = [
    sys.executable,
    "-m",
    "hmar_jax.evaluate",
    str(samples),
    f"--ref={tmp_path / 'no_ref.npz'}",
    f"--inception={weights}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "no_ref.npz" in lines[0]


def test_a_missing_samples_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="gone.npz"):
    open_image_batch(tmp_path / "gone.npz", "samples file")


def test_a_file_that_is_not_an_npz_is_refused(tmp_path):
  path = tmp_path / "ref.npz"
  path.write_text("not a zip")
  with pytest.raises(ValueError, match="not a readable .npz"):
    open_image_batch(path, "reference batch")


def test_an_npz_without_arr_0_is_refused_naming_its_arrays(tmp_path):
  path = tmp_path / "ref.npz"
  np.savez(path, images=_images())
  with pytest.raises(ValueError, match=r"no 'arr_0'.*images"):
    open_image_batch(path, "reference batch")


@pytest.mark.parametrize(
  "images", [np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8, 4), np.uint8)]
)
def test_images_that_are_not_uint8_rgb_are_refused(tmp_path, images):
  path = tmp_path / "s.npz"
  np.savez(path, arr_0=images)
  with pytest.raises(ValueError, match=r"uint8 images \[N, H, W, 3\]"):
    open_image_batch(path, "samples file")


def test_reference_statistics_are_read_when_present(tmp_path):
  path = tmp_path / "ref.npz"
  rng = np.random.default_rng(0)
  stats = {
    "mu": rng.standard_normal(2048),
    "sigma": np.eye(2048),
    "mu_s": rng.standard_normal(2023),
    "sigma_s": np.eye(2023),
  }
  np.savez(path, arr_0=_images(), **stats)
  got = reference_statistics(open_image_batch(path, "reference batch"))
  for k, v in stats.items():
    np.testing.assert_array_equal(got[k], v)


def test_a_reference_without_statistics_gets_them_computed(tmp_path):
  path = tmp_path / "ref.npz"
  np.savez(path, arr_0=_images())
  assert reference_statistics(open_image_batch(path, "reference batch")) is None


def test_incomplete_reference_statistics_are_refused_naming_the_missing_keys(tmp_path):
  path = tmp_path / "ref.npz"
  np.savez(path, arr_0=_images(), mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(ValueError, match=r"lacks \['mu_s', 'sigma_s'\]"):
    reference_statistics(open_image_batch(path, "reference batch"))


def test_misshaped_reference_statistics_are_refused_naming_the_key(tmp_path):
  path = tmp_path / "ref.npz"
  np.savez(path, arr_0=_images(), mu=np.zeros(1000), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  with pytest.raises(ValueError, match=r"'mu' must be a float array \(2048,\)"):
    reference_statistics(open_image_batch(path, "reference batch"))
