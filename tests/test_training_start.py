"""A fresh run's start: the step compiles from the state's shapes on a second thread while the
state is made, the loop then steps with that executable, and what can be refused is refused first."""

import threading

import jax
import numpy as np
import pytest
from training_helpers import nsp_config

from hmar_jax.training.trainer import Trainer


def _first_batch(trainer):
  return trainer.global_batch(next(iter(trainer.make_loader(0))))


def test_a_fresh_run_compiles_its_step_on_a_second_thread_and_steps_with_it(tmp_path, monkeypatch):
  compiled_on, stepped_with = [], []
  compile_step, compiled_step = Trainer.compile_step, Trainer.compiled_step

  def spy_compile(self, batch):
    compiled_on.append(threading.current_thread().name)
    return compile_step(self, batch)

  def spy_step(self, batch):
    fn = compiled_step(self, batch)
    stepped_with.append(fn)
    return fn

  monkeypatch.setattr(Trainer, "compile_step", spy_compile)
  monkeypatch.setattr(Trainer, "compiled_step", spy_step)
  trainer = Trainer(nsp_config("hmar", steps=2), str(tmp_path))
  trainer.fit()
  assert len(compiled_on) == 1 and compiled_on[0].startswith("compile_step")
  loop_steps = [fn for fn in stepped_with if isinstance(fn, jax.stages.Compiled)]
  assert len(loop_steps) == 2 and loop_steps[0] is loop_steps[1]
  assert trainer._jitted_step._cache_size() == 0  # the jitted step was never called: nothing compiled twice


def test_the_step_compiled_beside_the_init_matches_init_then_jit(tmp_path):
  config = nsp_config("hmar")
  side_by_side = Trainer(config, str(tmp_path / "a"))
  batch = _first_batch(side_by_side)
  with side_by_side.mesh_context():
    state = side_by_side.init_state_compiling_step(batch)
    initial = jax.tree.map(np.asarray, state)  # the step donates the state
    executable = side_by_side.compiled_step(batch)
    assert isinstance(executable, jax.stages.Compiled)
    after, metrics = executable(state, batch)
  one_by_one = Trainer(config, str(tmp_path / "b"))
  with one_by_one.mesh_context():
    want_state = one_by_one.init_state()
    for got, want in zip(jax.tree.leaves(initial), jax.tree.leaves(want_state), strict=True):
      np.testing.assert_array_equal(got, np.asarray(want))
    want_after, want_metrics = one_by_one.compiled_step(batch)(want_state, batch)
  assert float(metrics["loss"]) == float(want_metrics["loss"])
  for got, want in zip(jax.tree.leaves(after.params), jax.tree.leaves(want_after.params), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_batch_of_other_shapes_gets_the_jitted_step(tmp_path):
  trainer = Trainer(nsp_config("hmar"), str(tmp_path))
  batch = _first_batch(trainer)
  trainer.compile_step(batch)
  other = {k: v.astype(np.int16) if k == "labels" else v for k, v in batch.items()}
  assert isinstance(trainer.compiled_step(batch), jax.stages.Compiled)
  assert not isinstance(trainer.compiled_step(other), jax.stages.Compiled)


def test_an_unloadable_pretrained_checkpoint_is_refused_before_the_step_compiles(tmp_path, monkeypatch):
  compiled = []
  monkeypatch.setattr(Trainer, "compile_step", lambda self, batch: compiled.append(batch))
  trainer = Trainer(nsp_config("hmar"), str(tmp_path))

  def unreadable():
    raise ValueError("init_from: not a parameter checkpoint")

  monkeypatch.setattr(trainer.task, "load_pretrained", unreadable)
  with pytest.raises(ValueError, match="not a parameter checkpoint"):
    trainer.fit()
  assert compiled == []
