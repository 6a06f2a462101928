"""model.remat_policy 'auto': the step is compiled keeping every activation, and compiled again with
the 'dots' policy only when XLA's memory analysis says it would not fit in the device's memory."""

import jax
import numpy as np
import pytest
from flax import nnx
from training_helpers import nsp_config

from hmar_jax.models.transformer import ScaleTransformer, check_model_config
from hmar_jax.training import trainer as trainer_lib
from hmar_jax.training.trainer import Trainer, step_bytes, step_fits


def _config(policy: str, steps: int = 2):
  c = nsp_config("hmar", steps=steps)
  c.model.remat_policy = policy
  return c


def _losses(trainer) -> list[float]:
  return [row["loss"] for row in trainer.fit()["history"]]


def _policy_in_step(trainer) -> str:
  """The remat policy of the model the step traces (built from the shapes of the state)."""
  abstract = trainer.abstract_state()
  return trainer.task.model(abstract.params, abstract.model_vars).remat_policy


def _compiled(trainer):
  batch = trainer.global_batch(next(iter(trainer.make_loader(0))))
  return trainer.compile_step(batch)


def test_auto_builds_a_model_that_keeps_every_activation():
  config = _config("auto").model
  check_model_config(config)
  assert ScaleTransformer(config, rngs=nnx.Rngs(0)).remat_policy == "none"


def test_the_compiled_step_reports_its_memory_on_cpu(tmp_path):
  executable = _compiled(Trainer(_config("none"), str(tmp_path)))
  assert step_bytes(executable) > 0


def test_a_step_that_fits_is_compiled_once_without_remat(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer_lib, "device_memory_limit", lambda: 2**40)
  trainer = Trainer(_config("auto"), str(tmp_path))
  executable = _compiled(trainer)
  assert step_fits(executable, 2**40) and not step_fits(executable, 1024)
  assert trainer.step_changes == []
  assert _policy_in_step(trainer) == "none"


def test_a_step_that_does_not_fit_is_recompiled_with_the_dots_policy(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer_lib, "device_memory_limit", lambda: 1024)
  trainer = Trainer(_config("auto"), str(tmp_path))
  _compiled(trainer)
  assert trainer.step_changes == ["model.remat_policy='dots'"]
  assert trainer.task.model_config.remat_policy == "dots"
  assert _policy_in_step(trainer) == "dots"


def test_an_explicit_policy_is_never_changed(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer_lib, "device_memory_limit", lambda: 1024)
  trainer = Trainer(_config("none"), str(tmp_path))
  _compiled(trainer)
  assert trainer.step_changes == []
  assert _policy_in_step(trainer) == "none"


def test_the_recompiled_run_trains_as_an_explicit_dots_run(tmp_path, monkeypatch):
  want = _losses(Trainer(_config("dots"), str(tmp_path / "dots")))
  monkeypatch.setattr(trainer_lib, "device_memory_limit", lambda: 1024)
  trainer = Trainer(_config("auto"), str(tmp_path / "auto"))
  got = _losses(trainer)
  assert trainer.step_changes == ["model.remat_policy='dots'"]
  np.testing.assert_allclose(got, want, rtol=1e-6)  # same maths; float32 rounding at most


@pytest.mark.parametrize("policy", ["auto", "none"])
def test_a_resumed_run_fits_its_step_to_memory_too(tmp_path, monkeypatch, policy):
  Trainer(_config(policy, steps=2), str(tmp_path)).fit()
  monkeypatch.setattr(trainer_lib, "device_memory_limit", lambda: 1024)
  resumed = Trainer(_config(policy, steps=4), str(tmp_path))
  result = resumed.fit()
  assert result["step"] == 4
  assert resumed.step_changes == (["model.remat_policy='dots'"] if policy == "auto" else [])
  assert isinstance(resumed._compiled_step[1], jax.stages.Compiled)


def test_a_memory_limit_set_on_the_trainer_replaces_the_devices(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer_lib, "device_memory_limit", lambda: 2**40)
  trainer = Trainer(_config("auto"), str(tmp_path))
  trainer.memory_limit_bytes = 1024  # as hmar_jax.aot sets a TPU chip's HBM
  _compiled(trainer)
  assert trainer.step_changes == ["model.remat_policy='dots'"]


def test_a_compile_refused_for_lack_of_memory_is_retried_with_the_dots_policy(tmp_path, monkeypatch):
  compile_ = jax.stages.Lowered.compile
  calls = []

  def refuse_once(self, *a, **k):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 188.79G of 95.74G hbm.")
    return compile_(self, *a, **k)

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse_once)
  trainer = Trainer(_config("auto"), str(tmp_path))
  assert isinstance(_compiled(trainer), jax.stages.Compiled)
  assert len(calls) == 2 and trainer.step_changes == ["model.remat_policy='dots'"]


def test_a_refused_compile_with_nothing_leaner_is_raised(tmp_path, monkeypatch):
  def refuse(self, *a, **k):
    raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.")

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  trainer = Trainer(_config("dots"), str(tmp_path))
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    _compiled(trainer)
  assert trainer.step_changes == []


def test_other_compile_errors_are_not_taken_for_memory(tmp_path, monkeypatch):
  def broken(self, *a, **k):
    raise RuntimeError("INTERNAL: something else")

  monkeypatch.setattr(jax.stages.Lowered, "compile", broken)
  trainer = Trainer(_config("auto"), str(tmp_path))
  with pytest.raises(RuntimeError, match="INTERNAL"):
    _compiled(trainer)
  assert trainer.step_changes == []
