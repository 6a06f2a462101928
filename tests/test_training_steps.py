"""Training steps: weighted next-scale loss, masked loss, and which parameters a step may change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax.models.config import tiny_model_config
from hmar_jax.models.transformer import ScaleTransformer
from hmar_jax.training import loss_weights, mask_finetune, nsp, optim
from hmar_jax.training.state import create_train_state

PATCH_NUMS = (1, 2, 3, 5, 8)
L = sum(p * p for p in PATCH_NUMS)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def model():
  return ScaleTransformer(tiny_model_config("hmar"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"labels": jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
          "indices": jnp.asarray(rng.integers(0, 64, (4, L)), jnp.int32),
          "teacher_inputs": jnp.asarray(rng.normal(size=(4, L - 1, 8)), jnp.float32),
          "mask_inputs": jnp.asarray(rng.normal(size=(4, L - 1, 8)), jnp.float32)}


def test_nsp_loss_is_the_lognorm_weighted_token_cross_entropy(model, batch):
  key = jax.random.key(3)
  loss, metrics = nsp.nsp_loss_fn(PATCH_NUMS, "lognorm")(model, batch, key)
  logits = model.nsp_logits(batch["labels"], batch["teacher_inputs"], train=True, key=key)
  ce = -np.take_along_axis(_np_log_softmax(logits), np.asarray(batch["indices"])[..., None], -1)[..., 0]
  want = (ce * loss_weights.token_loss_weights(PATCH_NUMS, "lognorm").astype(np.float64)).sum(-1).mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce_mean"]), ce.mean(), rtol=1e-5)


def test_masked_loss_ignores_unmasked_tokens():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 30, 16)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 16, (2, 30)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 30)) < 0.4)
  loss = mask_finetune.masked_mean_cross_entropy(logits, targets, mask)
  ce = -np.take_along_axis(_np_log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), ce[np.asarray(mask)].mean(), rtol=1e-5)
  noise = jnp.asarray(rng.normal(size=logits.shape) * 10, jnp.float32)
  unmasked_changed = jnp.where(mask[..., None], logits, logits + noise)
  assert float(mask_finetune.masked_mean_cross_entropy(unmasked_changed, targets, mask)) == pytest.approx(float(loss), rel=1e-6)
  grad = jax.grad(mask_finetune.masked_mean_cross_entropy)(logits, targets, mask)
  assert float(jnp.abs(jnp.where(mask[..., None], 0.0, grad)).max()) == 0.0
  assert float(jnp.abs(jnp.where(mask[..., None], grad, 0.0)).max()) > 0.0


def _changed(a, b):
  return {optim.path_name(p): bool(np.any(np.asarray(x) != np.asarray(y)))
          for (p, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                    jax.tree_util.tree_flatten_with_path(b)[0])}


def test_finetuning_step_changes_the_mask_branch_and_nothing_else(model, batch):
  tx = optim.make_optimizer(learning_rate=1e-3, trainable=mask_finetune.in_mask_branch)
  state = create_train_state(model, tx, seed=0)
  before = jax.tree.map(np.asarray, state.params)
  trainable = optim.trainable_mask(state.params, mask_finetune.in_mask_branch)
  step = jax.jit(mask_finetune.make_mask_train_step(PATCH_NUMS, trainable=trainable))
  new_state, metrics = step(state, batch)
  changed = _changed(before, new_state.params)
  frozen = {n for n in changed if not mask_finetune.in_mask_branch(n)}
  train = set(changed) - frozen
  assert frozen and train and any(n.startswith("mask_embed") for n in train)
  assert not [n for n in frozen if changed[n]], "frozen parameters changed"
  assert [n for n in train if not changed[n]] == [], "some trainable parameters did not change"
  assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["mask_ratio"]) < 1
  # Frozen parameters carry no optimiser state (set_to_zero); Adam moments exist for the branch only.
  n_moments = sum(np.size(x) for x in jax.tree.leaves(new_state.opt_state) if np.ndim(x) > 0)
  n_train = sum(np.size(before_leaf) for n, before_leaf in zip(changed, jax.tree.leaves(before)) if n in train)
  assert n_moments == 2 * n_train
