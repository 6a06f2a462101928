"""Training steps: the weighted next-scale loss, the masked loss, what a step may change, gradient
accumulation and EMA, through the shared trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_helpers import nsp_config

from hmar_jax import checkpoint
from hmar_jax.models import ScaleTransformer, count_params, tiny_model_config
from hmar_jax.training import loss_weights
from hmar_jax.training.tasks.mask_finetune import in_mask_branch, masked_mean_cross_entropy
from hmar_jax.training.tasks.next_scale import nsp_loss
from hmar_jax.training.trainer import Trainer, join_micro_batches, split_micro_batches

PATCH_NUMS = (1, 2, 3, 5, 8)
L = sum(p * p for p in PATCH_NUMS)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_nsp_loss_is_the_lognorm_weighted_token_cross_entropy():
  model = ScaleTransformer(tiny_model_config("hmar"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {
    "labels": jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
    "indices": jnp.asarray(rng.integers(0, 64, (4, L)), jnp.int32),
    "teacher_inputs": jnp.asarray(rng.normal(size=(4, L - 1, 8)), jnp.float32),
  }
  key = jax.random.key(3)
  weights = loss_weights.token_loss_weights(PATCH_NUMS, "lognorm")
  loss, metrics = nsp_loss(model, batch, key, jnp.asarray(weights))
  logits = model.nsp_logits(batch["labels"], batch["teacher_inputs"], train=True, key=key)
  ce = -np.take_along_axis(_np_log_softmax(logits), np.asarray(batch["indices"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), (ce * weights.astype(np.float64)).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce_mean"]), ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(metrics["ce_per_scale"]),
    [ce[:, a:b].mean() for a, b in zip(np.cumsum([0, 1, 4, 9, 25]), np.cumsum([1, 4, 9, 25, 64]), strict=True)],
    rtol=1e-5,
  )


def test_masked_loss_ignores_unmasked_tokens():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 30, 16)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 16, (2, 30)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 30)) < 0.4)
  loss = masked_mean_cross_entropy(logits, targets, mask)
  ce = -np.take_along_axis(_np_log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), ce[np.asarray(mask)].mean(), rtol=1e-5)
  noise = jnp.asarray(rng.normal(size=logits.shape) * 10, jnp.float32)
  unmasked_changed = jnp.where(mask[..., None], logits, logits + noise)
  assert float(masked_mean_cross_entropy(unmasked_changed, targets, mask)) == pytest.approx(float(loss), rel=1e-6)
  grad = jax.grad(masked_mean_cross_entropy)(logits, targets, mask)
  assert float(jnp.abs(jnp.where(mask[..., None], 0.0, grad)).max()) == 0.0
  assert float(jnp.abs(jnp.where(mask[..., None], grad, 0.0)).max()) > 0.0


def _one_step(trainer):
  state = trainer.init_state()
  before = jax.tree.map(np.asarray, state)
  batch = trainer.global_batch(next(iter(trainer.make_loader(0))))
  after, metrics = trainer.compiled_step(batch)(state, batch)
  return before, jax.tree.map(np.asarray, after), metrics


def test_next_scale_training_allocates_no_masked_branch(tmp_path):
  trainer = Trainer(nsp_config("hmar"), str(tmp_path))
  state = trainer.init_state()
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
  assert names and not [n for n in names if "mask" in n]
  full = ScaleTransformer(tiny_model_config("hmar"), rngs=nnx.Rngs(0))
  assert sum(np.size(x) for x in jax.tree.leaves(state.params)) == count_params(full, exclude_mask_branch=True)


@pytest.fixture(scope="module")
def finetune_step(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune")
  m = tiny_model_config("hmar")
  m.mask_layers = 0
  init = checkpoint.save_params(
    str(root / "init"), ScaleTransformer(m, rngs=nnx.Rngs(1)), metadata={"model": m.to_dict()}
  )
  config = nsp_config("hmar")
  config.task = "mask_finetune"
  config.loss.weighting = "mask_unweighted"
  config.loss.same_mask_positions_for_batch = True
  config.init_from = init
  trainer = Trainer(config, str(root / "run"))
  return trainer, _one_step(trainer)


def test_finetuning_trains_the_mask_branch_and_holds_the_rest(finetune_step):
  _, (before, after, metrics) = finetune_step
  trained = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(before.params)[0]]
  assert trained and all(in_mask_branch(n.strip("[]'").split("'")[0]) for n in trained)
  assert any("mask_embed" in n for n in trained)
  for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
    assert np.any(a != b)
  for a, b in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(after.frozen), strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["mask_ratio"]) < 1


def test_frozen_parameters_carry_no_optimiser_state(finetune_step):
  _, (before, _, _) = finetune_step
  moments = sum(np.size(x) for x in jax.tree.leaves(before.opt_state) if np.ndim(x) > 0)
  assert moments == 2 * sum(np.size(x) for x in jax.tree.leaves(before.params))  # Adam mu and nu


def test_the_masked_branch_starts_as_a_copy_of_the_last_next_scale_blocks(finetune_step):
  _, (before, _, _) = finetune_step
  first = tiny_model_config("hmar").depth - tiny_model_config("hmar").mask_layers
  for a, b in zip(
    jax.tree.leaves(before.params["mask_blocks"][0]), jax.tree.leaves(before.frozen["blocks"][first]), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_micro_batches_split_and_join_back_in_order():
  x = jnp.arange(24).reshape(12, 2)
  parts = split_micro_batches(x, 3)
  assert parts.shape == (3, 4, 2)
  np.testing.assert_array_equal(parts[1, :, 0], [2, 8, 14, 20])  # rows 1, 4, 7, 10
  np.testing.assert_array_equal(join_micro_batches(parts), x)


def _deterministic(config):
  config.model.cond_drop_rate = 0.0  # no randomness that depends on how the batch is cut
  config.model.drop_path_rate = 0.0
  return config


def test_gradient_accumulation_gives_the_whole_batch_update(tmp_path):
  whole = Trainer(_deterministic(nsp_config("hmar", batch=8)), str(tmp_path / "a"))
  config = _deterministic(nsp_config("hmar", batch=8))
  config.train.grad_accum_steps = 4
  accumulated = Trainer(config, str(tmp_path / "b"))
  _, a, ma = _one_step(whole)
  _, b, mb = _one_step(accumulated)
  assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
  assert float(mb["grad_norm"]) == pytest.approx(float(ma["grad_norm"]), rel=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_ema_follows_the_parameters_with_the_configured_decay(tmp_path):
  config = nsp_config("hmar")
  config.train.ema_decay = 0.75
  before, after, _ = _one_step(Trainer(config, str(tmp_path)))
  for e0, p1, e1 in zip(
    jax.tree.leaves(before.ema_params), jax.tree.leaves(after.params), jax.tree.leaves(after.ema_params), strict=True
  ):
    np.testing.assert_allclose(e1, 0.75 * e0 + 0.25 * p1, rtol=1e-6, atol=1e-7)
