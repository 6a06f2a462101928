"""Stopped runs: Ctrl-C (SIGINT) and SIGTERM save the step reached and stop cleanly; a crash loses only
the steps after the last checkpoint; a rerun resumes exactly, and metrics.jsonl reads as one run.

The signals are sent in-process by a trainer that signals itself as it takes a chosen batch (so the
step saved is known); the command line's main() runs with that trainer in place of the real one.
A next-scale run is crashed after a checkpoint, rerun and stopped by Ctrl-C, then rerun to the end;
a masked-finetune run is stopped by Ctrl-C and rerun. Their metrics rows must equal, value for
value (bit for bit on CPU), those of runs never stopped. (A real SIGTERM sent to a separate
process: tests/test_training_resume.py.)
"""

import contextlib
import glob
import io
import os
import signal
import struct
from types import SimpleNamespace

import pytest
from flax import nnx
from tensorboardX.proto import event_pb2
from training_helpers import hooked_trainer, mask_config, nsp_config, read_jsonl

from hmar_jax import checkpoint
from hmar_jax import train as train_cli
from hmar_jax.models import ScaleTransformer, tiny_model_config
from hmar_jax.training.checkpointing import CheckpointManager
from hmar_jax.training.trainer import Trainer, _stop_signals, _StopSignals

STEPS = 6
TIMING = {"img_s", "tokens_s", "tflops_per_device", "mfu"}  # wall-clock figures differ between runs


def _config(task, init_from=None):
  c = nsp_config("hmar", steps=STEPS) if task == "nsp" else mask_config(init_from, steps=STEPS)
  c.log.every_steps = 2  # stops at odd steps leave a log window open across the restart
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False  # a crash must not leave a save in flight
  c.log.tensorboard = True
  return c


def _signal_self(signum):
  return lambda: os.kill(os.getpid(), signum)


def _crash():
  raise RuntimeError("simulated crash")


def _cli(config, workdir, trainer_factory):
  """Runs hmar_jax.train's main() with `trainer_factory(config, workdir)` as the trainer:
  (exit status, None when it returned, and what it printed on stderr)."""
  err = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
    mp.setattr(train_cli, "_CONFIG", SimpleNamespace(value=config))
    mp.setattr(train_cli, "_WORKDIR", SimpleNamespace(value=str(workdir)))
    mp.setattr(train_cli, "run_task", lambda c, w: trainer_factory(c, w).fit())
    try:
      train_cli.main(["train"])
      code = None
    except SystemExit as e:
      code = e.code
  return code, err.getvalue()


def _rows(workdir):
  """metrics.jsonl without the wall-clock figures ([] before the first row)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(path)]


def _saved_steps(workdir):
  ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=2)
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


@pytest.fixture(scope="module")
def nsp(tmp_path_factory):
  """A straight run, and one that crashes as it takes batch 5 (steps 1-4 done, rows 2 and 4
  logged, checkpoint at 3), is rerun and stopped by Ctrl-C after step 5, then rerun to the end."""
  root = tmp_path_factory.mktemp("nsp")
  Trainer(_config("nsp"), str(root / "straight")).fit()
  run = root / "stopped"
  out = SimpleNamespace(root=root)
  with pytest.raises(RuntimeError, match="simulated crash"):
    hooked_trainer(_config("nsp"), str(run), at=5, hook=_crash).fit()
  out.crashed = SimpleNamespace(rows=_rows(run), saved=_saved_steps(run))
  code, err = _cli(_config("nsp"), run, lambda c, w: hooked_trainer(c, w, at=2, hook=_signal_self(signal.SIGINT)))
  out.interrupted = SimpleNamespace(code=code, err=err, rows=_rows(run), saved=_saved_steps(run))
  out.rerun_code, _ = _cli(_config("nsp"), run, Trainer)
  return out


@pytest.fixture(scope="module")
def mask_finetune(tmp_path_factory):
  """A straight masked-finetune run, and one stopped by Ctrl-C after step 2, then rerun."""
  root = tmp_path_factory.mktemp("mask")
  m = tiny_model_config("hmar")
  m.mask_layers = 0
  init = checkpoint.save_params(
    str(root / "init"), ScaleTransformer(m, rngs=nnx.Rngs(1)), metadata={"model": m.to_dict()}
  )
  Trainer(_config("mask_finetune", init), str(root / "straight")).fit()
  run = root / "stopped"
  code, _ = _cli(
    _config("mask_finetune", init), run, lambda c, w: hooked_trainer(c, w, at=2, hook=_signal_self(signal.SIGINT))
  )
  saved = _saved_steps(run)
  rerun_code, _ = _cli(_config("mask_finetune", init), run, Trainer)
  return SimpleNamespace(root=root, code=code, saved=saved, rerun_code=rerun_code)


def test_a_crash_keeps_the_checkpoint_before_it_and_the_rows_logged(nsp):
  assert nsp.crashed.saved == [3]
  assert [r["step"] for r in nsp.crashed.rows] == [2, 4]


def test_a_rerun_drops_the_rows_logged_after_its_checkpoint_and_logs_them_again(nsp):
  # Resumed from step 3, stopped after 5: row 4 is the rerun's (no second row 4), and equals the
  # straight run's row 4, the mean over steps 3 and 4 (step 3's metrics came back with the state).
  assert [r["step"] for r in nsp.interrupted.rows] == [2, 4]
  assert nsp.interrupted.rows == _rows(nsp.root / "straight")[:2]


def test_ctrl_c_saves_a_checkpoint_at_the_step_reached(nsp, mask_finetune):
  assert nsp.interrupted.saved == [3, 5]
  assert mask_finetune.saved == [2]  # no periodic checkpoint was due (every 3 steps)


def test_ctrl_c_exits_130_with_one_line_naming_the_step_saved_and_how_to_resume(nsp):
  assert nsp.interrupted.code == 130
  err = nsp.interrupted.err
  lines = [line for line in err.splitlines() if "stopped" in line]  # (the rest: progress bars)
  assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
  assert "stopped by SIGINT at step 5:" in lines[0]
  assert str(nsp.root / "stopped" / "checkpoints") in lines[0] and "rerun the same command to resume" in lines[0]


def test_a_next_scale_run_crashed_stopped_and_rerun_logs_the_uninterrupted_rows(nsp):
  assert nsp.rerun_code is None  # finished
  straight, resumed = _rows(nsp.root / "straight"), _rows(nsp.root / "stopped")
  assert [r["step"] for r in straight] == [2, 4, 6]
  assert resumed == straight  # every metric, bit for bit


def test_a_masked_finetune_run_stopped_by_ctrl_c_and_rerun_logs_the_uninterrupted_rows(mask_finetune):
  assert mask_finetune.code == 130 and mask_finetune.rerun_code is None
  straight, resumed = _rows(mask_finetune.root / "straight"), _rows(mask_finetune.root / "stopped")
  assert [r["step"] for r in straight] == [2, 4, 6]
  assert resumed == straight


def _session_starts(path):
  """Steps of the session-start markers of a TFRecord event file (framing: length, crc, data, crc)."""
  with open(path, "rb") as f:
    data = f.read()
  starts, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    pos += 12 + length + 4
    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
      starts.append(event.step)
  return starts


def test_each_rerun_tells_tensorboard_to_drop_the_older_events_past_its_checkpoint(nsp):
  files = glob.glob(str(nsp.root / "stopped" / "tensorboard" / "events.out.tfevents.*"))
  assert sorted(_session_starts(f) for f in files) == [[1], [4], [6]]  # fresh, resumed at 3, resumed at 5


def test_a_second_ctrl_c_raises_keyboard_interrupt_at_once_and_the_handler_is_restored():
  previous = signal.getsignal(signal.SIGINT)
  with _StopSignals((signal.SIGINT, signal.SIGTERM)) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.received == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      signal.getsignal(signal.SIGINT)  # the handler runs before the next bytecode at the latest
  assert signal.getsignal(signal.SIGINT) is previous


def test_a_second_ctrl_c_exits_130_saying_nothing_more_was_saved(tmp_path):
  def interrupted(config, workdir):
    raise KeyboardInterrupt

  err = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
    mp.setattr(train_cli, "_CONFIG", SimpleNamespace(value=_config("nsp")))
    mp.setattr(train_cli, "_WORKDIR", SimpleNamespace(value=str(tmp_path)))
    mp.setattr(train_cli, "run_task", interrupted)
    with pytest.raises(SystemExit) as exit_info:
      train_cli.main(["train"])
  assert exit_info.value.code == 130
  assert "stopped without saving" in err.getvalue() and str(tmp_path / "checkpoints") in err.getvalue()


def test_with_several_processes_sigterm_is_left_to_jax_and_ctrl_c_is_passed_on_as_sigterm():
  """JAX's preemption notifier (a SIGTERM handler installed by jax.distributed) makes every process
  stop at the same step; a Python SIGTERM handler would replace it. A stand-in records SIGTERM here."""
  received = []

  def notifier(signum, frame):
    received.append(signal.Signals(signum).name)

  previous = signal.signal(signal.SIGTERM, notifier)
  try:
    with _stop_signals(2, on_preemption=True) as stop:
      assert signal.getsignal(signal.SIGTERM) is notifier  # left in place
      os.kill(os.getpid(), signal.SIGINT)
      signal.getsignal(signal.SIGINT)  # the handlers run before the next bytecode at the latest
    assert stop.received == "SIGINT" and received == ["SIGTERM"]
  finally:
    signal.signal(signal.SIGTERM, previous)
