"""The command-line entry points turn JAX's persistent compilation cache on (a rerun loads what the
first run compiled) in a folder under the user's cache directory, unless the environment names
another folder or none."""

import os
import subprocess
import sys

import jax
import pytest

from hmar_jax.compile_cache import ENV, default_cache_dir, enable_compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def jax_cache_setting():
  """Restores the suite's own cache folder (tests/conftest.py) after the test changes it."""
  before = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def test_without_the_variable_the_cache_goes_under_the_users_cache_dir(tmp_path, monkeypatch, jax_cache_setting):
  monkeypatch.delenv(ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  want = str(tmp_path / "hmar_jax" / "jax_compilation_cache")
  assert default_cache_dir() == want
  assert enable_compilation_cache() == want
  assert jax.config.jax_compilation_cache_dir == want and os.path.isdir(want)


def test_a_folder_in_the_variable_is_left_to_jax(tmp_path, monkeypatch, jax_cache_setting):
  monkeypatch.setenv(ENV, str(tmp_path / "mine"))
  before = jax.config.jax_compilation_cache_dir
  assert enable_compilation_cache() == str(tmp_path / "mine")
  assert jax.config.jax_compilation_cache_dir == before  # JAX read the variable itself at start-up


def test_an_empty_variable_means_no_cache(monkeypatch, jax_cache_setting):
  monkeypatch.setenv(ENV, "")
  before = jax.config.jax_compilation_cache_dir
  assert enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == before


def test_an_unwritable_cache_home_runs_without_the_cache(tmp_path, monkeypatch, jax_cache_setting):
  monkeypatch.delenv(ENV, raising=False)
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
  before = jax.config.jax_compilation_cache_dir
  assert enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == before


def test_an_entry_point_runs_with_the_cache_on(tmp_path):
  # hmar_jax.cli.run is what every entry point (train, sample, edit, evaluate, aot, the quick start)
  # runs through; a tiny absl program through it reports the cache folder JAX was given.
  program = (
    "import jax\n"
    "from hmar_jax import cli\n"
    "def main(argv):\n"
    "  print('CACHE', jax.config.jax_compilation_cache_dir)\n"
    "cli.run(main)\n"
  )
  env = {k: v for k, v in os.environ.items() if k != ENV}
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
  ).stdout
  assert f"CACHE {tmp_path / 'hmar_jax' / 'jax_compilation_cache'}" in out
