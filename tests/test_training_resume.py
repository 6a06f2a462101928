"""Stopping and resuming: SIGTERM, non-finite losses, unfinished checkpoints, unreadable images.
A resumed run must give exactly the losses of a run that was never stopped. (Ctrl-C, crashes and
metrics.jsonl across reruns: tests/test_training_signals.py; restoring onto another mesh:
tests/test_training_sharded.py.)"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from training_helpers import nsp_config, read_jsonl, tokenizer_config

from hmar_jax.training.checkpointing import CheckpointManager
from hmar_jax.training.tasks import NextScaleTask, TokenizerTask
from hmar_jax.training.trainer import NonFiniteLossError, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _losses(workdir) -> dict[int, float]:
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows}


# ----------------------------------------------------------------------------- SIGTERM


CONFIG_FILE = textwrap.dedent("""
  import sys
  sys.path.insert(0, {tests!r})
  import training_helpers as th

  def get_config():
    c = th.nsp_config("hmar", steps={steps})
    c.checkpoint.every_steps = 1000   # only the end, or the SIGTERM save
    return c
""")


def _start(config_file, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
  return subprocess.Popen(
    [sys.executable, "-m", "hmar_jax.train", f"--config={config_file}", f"--workdir={workdir}"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _logged_steps(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return len(f.readlines())


def _sigterm_config(steps):
  c = nsp_config("hmar", steps=steps)
  c.checkpoint.every_steps = 1000  # as in CONFIG_FILE
  return c


@pytest.fixture(scope="module")
def sigterm_runs(tmp_path_factory):
  """A command-line run sent SIGTERM after 5 logged steps, then resumed, and a straight run (both
  in this process: the same trainer as the command line's, without two more process start-ups)."""
  root = tmp_path_factory.mktemp("sigterm")
  steps = 60
  config_file = root / "config.py"
  config_file.write_text(CONFIG_FILE.format(tests=TESTS, steps=steps))
  interrupted = _start(config_file, root / "interrupted")
  try:
    deadline = time.time() + 240
    while _logged_steps(root / "interrupted") < 5 and interrupted.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    interrupted.send_signal(signal.SIGTERM)
    _, err = interrupted.communicate(timeout=120)
  finally:
    if interrupted.poll() is None:
      interrupted.kill()
  stopped_at = _logged_steps(root / "interrupted")
  ckpt = CheckpointManager(root / "interrupted" / "checkpoints", max_to_keep=2)
  saved = ckpt.all_steps()
  ckpt.close()
  Trainer(_sigterm_config(steps), str(root / "straight")).fit()
  Trainer(_sigterm_config(steps), str(root / "interrupted")).fit()
  return root, steps, interrupted.returncode, err, stopped_at, saved


def test_sigterm_saves_a_checkpoint_and_exits_143(sigterm_runs):
  root, steps, code, err, stopped_at, saved = sigterm_runs
  assert code == 143, err[-2000:]
  assert f"stopped by SIGTERM at step {stopped_at}:" in err and "rerun the same command to resume" in err
  assert 5 <= stopped_at < steps
  assert saved == [stopped_at]  # the step reached, every step of it logged


def test_a_run_stopped_by_sigterm_and_resumed_gives_the_uninterrupted_losses(sigterm_runs):
  root, steps, _, _, _, _ = sigterm_runs
  straight, resumed = _losses(root / "straight"), _losses(root / "interrupted")
  assert sorted(resumed) == list(range(1, steps + 1)) == sorted(straight)
  for step in range(1, steps + 1):
    assert resumed[step] == straight[step], f"step {step}: {resumed[step]} vs {straight[step]}"


# ----------------------------------------------------------------------------- faults


class NaNAtStep3(NextScaleTask):
  """The next-scale task with a loss that is NaN at the third step."""

  def loss(self, params, state, batch, key):
    loss, metrics, aux = super().loss(params, state, batch, key)
    return jnp.where(state.step == 2, jnp.nan, loss), metrics, aux


def _constant_lr(config):
  config.optim.schedule = "constant"  # the same learning rates whatever num_steps is
  return config


def test_a_non_finite_loss_stops_the_run_after_saving_the_last_good_state(tmp_path):
  config = _constant_lr(nsp_config("hmar", steps=6))
  config.checkpoint.every_steps = 100
  trainer = Trainer(config, str(tmp_path / "nan"), task=NaNAtStep3(config, str(tmp_path / "nan")))
  with pytest.raises(NonFiniteLossError, match="not finite at step 3.*after step 2"):
    trainer.fit()
  ckpt = CheckpointManager(tmp_path / "nan" / "checkpoints", max_to_keep=2)
  assert ckpt.all_steps() == [2]
  ckpt.close()
  clean = Trainer(_constant_lr(nsp_config("hmar", steps=2)), str(tmp_path / "clean"))
  assert clean.fit()["step"] == 2
  restored, _, _ = trainer.restore_or_init(trainer.checkpoints())
  want, _, _ = clean.restore_or_init(clean.checkpoints())
  assert int(restored.step) == 2 and int(restored.halted_at) == -1
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(want.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_unfinished_checkpoint_is_never_restored(tmp_path):
  config = nsp_config("hmar", steps=2)
  Trainer(config, str(tmp_path)).fit()
  ckpts = tmp_path / "checkpoints"
  (ckpts / "7.orbax-checkpoint-tmp-1700000000").mkdir()  # a save cut short
  (ckpts / "7.orbax-checkpoint-tmp-1700000000" / "junk").write_text("x")
  os.makedirs(ckpts / "9" / "state")  # a step folder with no commit marker
  config.train.num_steps = 3
  result = Trainer(config, str(tmp_path)).fit()
  assert [h["step"] for h in result["history"]] == [3]  # resumed from step 2
  assert sorted(os.listdir(ckpts)) == ["2", "3", "9.incomplete"]


def test_fewer_steps_than_the_checkpoint_is_refused_before_restoring_it(tmp_path, monkeypatch):
  config = nsp_config("hmar", steps=3)
  Trainer(config, str(tmp_path)).fit()
  config.train.num_steps = 2

  def restore_or_init(self, ckpt):
    raise AssertionError("restored a checkpoint the run cannot use")

  monkeypatch.setattr(Trainer, "restore_or_init", restore_or_init)
  with pytest.raises(ValueError, match="checkpoints in .* are at step 3, past config.train.num_steps = 2"):
    Trainer(config, str(tmp_path)).fit()
  ckpt = CheckpointManager(tmp_path / "checkpoints", max_to_keep=2)
  assert ckpt.all_steps() == [3]  # kept
  ckpt.close()


class TokenizerWithoutEvaluation(TokenizerTask):
  """The tokenizer task without its held-out reconstructions before and after training."""

  def begin(self, state, *, fresh, gather):
    pass

  def finish(self, state, host, *, primary):
    return {}


def test_unreadable_images_are_skipped_and_counted(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    os.makedirs(tmp_path / "images" / cls)
    for i in range(4):
      Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
  (tmp_path / "images" / "b" / "2.png").write_bytes(b"not a png")  # corrupt
  config = tokenizer_config(steps=2, batch=8, examples=8)
  config.data.source = "folder"
  config.data.path = str(tmp_path / "images")
  config.log.every_steps = 2
  trainer = Trainer(config, str(tmp_path / "run"), task=TokenizerWithoutEvaluation(config, str(tmp_path / "run")))
  loader = iter(trainer.make_loader(0))
  batches = [next(loader) for _ in range(2)]
  # One unreadable file per pass over the 8 images, replaced by a readable one; the step sums
  # 'skipped' into the skipped_images metric, and each metrics row holds the total over its steps.
  assert [int(b["skipped"].sum()) for b in batches] == [1, 1]
  assert all(b["image"].shape == (8, 16, 16, 3) for b in batches)
  assert trainer.fit()["step"] == 2
  rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [(r["step"], r["skipped_images"]) for r in rows] == [(2, 2.0)]
