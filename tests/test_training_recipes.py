"""Training recipes as the config sets them, against float64 NumPy references written from their
definitions: label smoothing (torch CrossEntropyLoss semantics), per-scale loss weights read from
config.loss.weighting, and the parameter EMA over a whole run (saved as the final weights)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_helpers import nsp_config

from hmar_jax import checkpoint
from hmar_jax.training.checkpointing import CheckpointManager
from hmar_jax.training.tasks import NextScaleTask
from hmar_jax.training.tasks.mask_finetune import masked_mean_cross_entropy
from hmar_jax.training.trainer import Trainer
from hmar_jax.training.trees import flatten


def _np_smoothed_ce(logits, targets, eps):
  """(..., V), (...) -> (...) float64: (1 - eps) * -log p[target] + eps * mean over classes of -log p."""
  x = np.asarray(logits, np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  return (1 - eps) * nll - eps * logp.mean(-1)


def _np_token_weights(patch_nums, weighting):
  """'uniform': every token 1 / L; 'equal': each scale's tokens share weight 1."""
  total = sum(p * p for p in patch_nums)
  if weighting == "uniform":
    return np.full(total, 1.0 / total)
  return np.concatenate([np.full(p * p, 1.0 / (p * p)) for p in patch_nums])


@pytest.fixture(scope="module")
def nsp_task(tmp_path_factory):
  """A next-scale task, its initial variables and a random batch (teacher inputs drawn directly)."""
  config = nsp_config("hmar")
  task = NextScaleTask(config, str(tmp_path_factory.mktemp("recipes")))
  variables = task.init_variables(jax.random.key(0))
  rng = np.random.default_rng(0)
  length = sum(p * p for p in task.patch_nums)
  batch = {
    "labels": jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
    "indices": jnp.asarray(rng.integers(0, config.tokenizer.config.vocab_size, (4, length)), jnp.int32),
    "teacher_inputs": jnp.asarray(rng.normal(size=(4, length - 1, config.model.cvae)), jnp.float32),
  }
  return task, variables, batch


@pytest.mark.parametrize("weighting", ["uniform", "equal"])
def test_next_scale_loss_smooths_labels_and_weights_scales_as_configured(nsp_task, weighting):
  task, variables, batch = nsp_task
  task = copy.copy(task)
  task.config = copy.deepcopy(task.config)
  task.config.loss.label_smoothing = 0.1
  task.config.loss.weighting = weighting
  state = type("State", (), {"model_vars": variables["model_vars"]})()
  key = jax.random.key(7)
  loss, metrics, _ = task.loss(variables["params"], state, batch, key)
  model = task.model(variables["params"], variables["model_vars"])
  logits = model.nsp_logits(batch["labels"], batch["teacher_inputs"], train=True, key=key)
  ce = _np_smoothed_ce(logits, batch["indices"], 0.1)
  want = (ce * _np_token_weights(task.patch_nums, weighting)).sum(-1).mean()
  np.testing.assert_allclose(float(loss), want, rtol=2e-6)
  # The logged cross entropy stays the plain one (comparable across smoothing settings).
  np.testing.assert_allclose(
    float(metrics["ce_mean"]), _np_smoothed_ce(logits, batch["indices"], 0.0).mean(), rtol=2e-6
  )


def test_masked_loss_smooths_labels_over_masked_positions_only():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 30, 16)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 16, (2, 30)), jnp.int32)
  mask = rng.random((2, 30)) < 0.4
  got = masked_mean_cross_entropy(logits, targets, jnp.asarray(mask), label_smoothing=0.2)
  np.testing.assert_allclose(float(got), _np_smoothed_ce(logits, targets, 0.2)[mask].mean(), rtol=2e-6)


def test_the_ema_of_a_run_is_the_decay_weighted_average_of_its_parameters(tmp_path):
  """ema_k = d**k p_0 + (1 - d) sum_t d**(k - t) p_t over the parameters p_t after each step t (the
  closed form of ema_t = d ema_(t-1) + (1 - d) p_t, ema_0 = p_0), and the final weights are the EMA."""
  decay, steps = 0.8, 4
  config = nsp_config("hmar", steps=steps)
  config.train.ema_decay = decay
  config.checkpoint.every_steps = 1
  config.checkpoint.max_to_keep = steps
  trainer = Trainer(config, str(tmp_path))
  initial = flatten(jax.device_get(trainer.init_state().params))
  trainer.fit()
  shardings, abstract = trainer.state_shardings(), trainer.abstract_state()
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract.as_dict(), shardings.as_dict()
  )
  ckpt = CheckpointManager(tmp_path / "checkpoints", max_to_keep=steps)
  history = [flatten(jax.device_get(ckpt.restore(t, target)[0]["params"])) for t in range(1, steps + 1)]
  ckpt.close()
  final = flatten(checkpoint.read_params_tree(tmp_path / "params"))
  assert sorted(final) == sorted(initial)
  for name in initial:
    want = decay**steps * np.asarray(initial[name], np.float64)
    for t, params in enumerate(history, 1):
      want = want + (1 - decay) * decay ** (steps - t) * np.asarray(params[name], np.float64)
    np.testing.assert_allclose(np.asarray(final[name], np.float64), want, rtol=1e-5, atol=1e-7, err_msg=name)
  assert any(not np.allclose(history[-1][n], final[n]) for n in initial)  # the EMA, not the last parameters
