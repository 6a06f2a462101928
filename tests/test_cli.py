"""Command lines: bad input ends in one 'error:' line and exit status 2, before any training."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_train_with_a_missing_tokenizer_checkpoint_fails_naming_it(tmp_path):
  result = _run(
    "hmar_jax.train",
    "--config=configs/hmar.py:tiny",
    f"--workdir={tmp_path}",
    "--config.tokenizer.checkpoint=/no/such/tokenizer",
  )
  assert result.returncode == 2
  assert "error:" in result.stderr and "/no/such/tokenizer" in result.stderr
  assert "Traceback" not in result.stderr


def test_train_with_an_unknown_task_fails_naming_the_choices(tmp_path):
  result = _run(
    "hmar_jax.train", "--config=configs/hmar.py:tiny", f"--workdir={tmp_path}", "--config.task=segmentation"
  )
  assert result.returncode == 2
  assert "config.task must be one of" in result.stderr and "'segmentation'" in result.stderr
