"""Learning on the built-in data: a tiny HMAR's next-scale loss falls, then masked finetuning's loss falls.

Runs the shared trainer end to end (token cache, resumable orbax checkpoints, final params) on 512
procedural 16 px images with a fixed random tokenizer. Measured on a loaded 2-core CPU: next-scale
held-out CE 4.16 -> ~3.2 nats after 200 steps; masked CE at p = 0.5 falls by ~0.1 nats in 100 steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_helpers import mask_config, nsp_config, read_jsonl

from hmar_jax import checkpoint
from hmar_jax.models import ScaleTransformer
from hmar_jax.tokenizer.vqvae import VQVAE, save_vqvae
from hmar_jax.training import token_cache
from hmar_jax.training.tasks.mask_finetune import in_mask_branch, mask_loss
from hmar_jax.training.tasks.next_scale import int_keys, nsp_metrics, split_maps
from hmar_jax.training.trainer import Trainer, train

NSP_STEPS, MASK_STEPS = 200, 100
NSP_MARGIN, MASK_MARGIN = 0.8, 0.04  # nats the held-out losses must fall by


def _torch_like_tokenizer(config, seed=0):
  """The tiny VQVAE with torch-default-like init, built abstractly and filled from NumPy."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VQVAE(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if "embedding" in name:  # official codebook init: U(+-1/V)
      v = rng.uniform(-1, 1, x.shape) / config.vocab_size
    elif name.endswith("scale/value"):
      v = np.ones(x.shape)
    elif "kernel" in name:
      v = rng.uniform(-1, 1, x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    else:  # biases, usage statistics
      v = np.zeros(x.shape)
    return jnp.asarray(v, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("learning")
  config = nsp_config("hmar", steps=NSP_STEPS, batch=32, examples=512)
  config.optim.lr = 8e-3
  config.optim.wpe = 0.1
  config.log.every_steps = 25
  config.checkpoint.every_steps = NSP_STEPS
  config.tokenizer.checkpoint = save_vqvae(str(root / "tokenizer"), _torch_like_tokenizer(config.tokenizer.config))
  result = train(config, str(root / "nsp"))
  return root, config, result


def _held_out(trainer, tokens):
  sel = slice(-128, None)
  return trainer.task.prepare_batch(
    {"labels": jnp.asarray(tokens["labels"][sel]), "indices": jnp.asarray(tokens["indices"][sel])}, {}
  )


def _tokens(path):
  return token_cache.TokenCacheSource.open(str(path)).arrays()


def test_tokens_are_cached_and_diverse(run):
  root, _, _ = run
  indices = _tokens(root / "nsp" / "tokens")["indices"]
  assert indices.shape == (512, 103)
  assert len(np.unique(indices[:, -64:])) >= 16  # a tokenizer that says something about the images


def test_next_scale_loss_falls(run):
  root, config, result = run
  trainer = Trainer(config, str(root / "nsp"))
  batch = _held_out(trainer, _tokens(root / "nsp" / "tokens"))
  fresh = trainer.init_state()

  @jax.jit
  def ce(params):
    logits = trainer.task.model(params).nsp_logits(batch["labels"], batch["teacher_inputs"])
    return nsp_metrics(logits, batch["indices"], config.model.patch_nums)["ce_mean"]

  m = trainer.task.model_config
  trained = checkpoint.restore_params(result["params"], nnx.eval_shape(lambda: ScaleTransformer(m, rngs=nnx.Rngs(0))))
  before, after = float(ce(fresh.params)), float(ce(nnx.to_pure_dict(nnx.state(trained, nnx.Param))))
  print(f"next-scale held-out CE: {before:.3f} -> {after:.3f}")
  assert before == pytest.approx(np.log(64), abs=0.05)  # the official init predicts ~uniformly
  assert before - after > NSP_MARGIN
  assert [h["step"] for h in result["history"]] == list(range(25, NSP_STEPS + 1, 25))


def test_next_scale_training_holds_no_masked_branch(run):
  _, _, result = run
  stored = checkpoint.read_params_tree(result["params"])
  assert "blocks" in stored and not [k for k in stored if in_mask_branch(k)]
  assert checkpoint.load_metadata(result["params"])["model"]["mask_layers"] == 0


def test_a_finished_run_restarts_from_its_checkpoint_without_training_again(run):
  root, config, first = run
  before = checkpoint.read_params_tree(first["params"])
  again = train(config, str(root / "nsp"))
  assert again["history"] == []  # the checkpoint at num_steps was found: nothing left to do
  after = checkpoint.read_params_tree(again["params"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)
  lines = read_jsonl(root / "nsp" / "metrics.jsonl")
  assert lines[-1]["step"] == NSP_STEPS


def test_masked_finetuning_loss_falls(run):
  root, nsp_cfg, result = run
  config = mask_config(result["params"], steps=MASK_STEPS, batch=32, examples=512)
  config.tokenizer.checkpoint = nsp_cfg.tokenizer.checkpoint
  config.data.tokens_cache = str(root / "nsp" / "tokens")  # reuse the next-scale run's tokens
  config.optim.lr = 2.4e-2
  config.optim.wpe = 0.1
  config.log.every_steps = 50
  config.checkpoint.every_steps = MASK_STEPS
  trainer = Trainer(config, str(root / "mask"))
  start = trainer.init_state()
  batch = _held_out(trainer, _tokens(root / "nsp" / "tokens"))

  @jax.jit
  def masked_ce(params, frozen):
    model = trainer.task.model({**frozen, **params})
    model.cond_drop_rate = 0.0
    return mask_loss(
      model, batch, jax.random.key(0), config.model.patch_nums, fixed_ratio=0.5, same_positions_for_batch=False
    )[1]["ce_masked"]

  before = float(masked_ce(start.params, start.frozen))
  out = train(config, str(root / "mask"))
  trained = int_keys(checkpoint.read_params_tree(out["params"]))
  frozen_after = {k: v for k, v in trained.items() if not in_mask_branch(k)}
  params_after = {k: v for k, v in trained.items() if in_mask_branch(k)}
  after = float(masked_ce(jax.tree.map(jnp.asarray, params_after), jax.tree.map(jnp.asarray, frozen_after)))
  print(f"masked CE at p=0.5: {before:.3f} -> {after:.3f}")
  assert before - after > MASK_MARGIN
  # The next-scale part of the model is exactly the one finetuning started from.
  for (p, a), b in zip(
    jax.tree_util.tree_flatten_with_path(start.frozen)[0], jax.tree.leaves(frozen_after), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(p))
  assert set(frozen_after) == set(start.frozen)


def test_held_out_split_maps_cover_every_token():
  maps = split_maps(jnp.arange(2 * 103).reshape(2, 103), (1, 2, 3, 5, 8))
  assert [m.shape for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 5, 5), (2, 8, 8)]
