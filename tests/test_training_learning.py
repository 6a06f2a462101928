"""Learning on the built-in data: a tiny HMAR's next-scale loss falls, then masked finetuning's loss falls.

Runs the real entry points (`train_nsp`, `train_mask_finetune`: token cache, resumable orbax
checkpoints, final params) on 512 procedural 16 px images with a fixed random tokenizer.
Measured on a loaded 2-core CPU: next-scale held-out CE 4.16 -> ~3.2 nats after 200 steps;
masked CE at p = 0.5 falls by ~0.1 nats in 100 steps.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import config_utils
from hmar_jax import checkpoint
from hmar_jax.models.config import tiny_model_config
from hmar_jax.tokenizer.vqvae import VQVAE, save_vqvae
from hmar_jax.training import mask_finetune, nsp

NSP_STEPS, MASK_STEPS = 200, 100
NSP_MARGIN, MASK_MARGIN = 0.8, 0.04   # nats the held-out losses must fall by


def _module(name):
  return config_utils.load_module(os.path.join(os.path.dirname(__file__), "..", "configs", name))


def _config(name):
  """The shipped training config, shrunk to the 16 px tiny tokenizer / transformer (fast on CPU)."""
  config = _module(name).get_config()
  config.model = tiny_model_config("hmar")
  config.tokenizer.config = _module("vqvae.py").get_config("tiny")
  return config


def _torch_like_tokenizer(config, seed=0):
  """The tiny VQVAE with torch-default-like init, built abstractly and filled from NumPy (eager
  initialisation compiles every op once: many seconds on a loaded CPU)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VQVAE(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if "embedding" in name:      # official codebook init: U(+-1/V)
      v = rng.uniform(-1, 1, x.shape) / config.vocab_size
    elif name.endswith("scale/value"):
      v = np.ones(x.shape)
    elif "kernel" in name:
      v = rng.uniform(-1, 1, x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    else:                        # biases, usage statistics
      v = np.zeros(x.shape)
    return jnp.asarray(v, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("learning")
  config = _config("train_hmar_tiny.py")
  tok_dir = save_vqvae(str(root / "tokenizer"), _torch_like_tokenizer(config.tokenizer.config))
  config.tokenizer.checkpoint = tok_dir
  config.data.num_examples = 512
  config.train.num_steps = NSP_STEPS
  config.train.log_every = 25
  config.train.checkpoint_every = NSP_STEPS
  config.sample.grid_at_end = False
  result = nsp.train_nsp(config, str(root / "nsp"))
  return root, config, result


def _held_out(config, tokens, with_mask_inputs=False):
  vqvae, _ = nsp.load_tokenizer(config)
  sel = slice(-128, None)
  return nsp.make_input_fn(vqvae.quantizer, with_mask_inputs=with_mask_inputs)(
      {"labels": tokens["labels"][sel], "indices": tokens["indices"][sel]})


def test_tokens_are_cached_and_diverse(run):
  root, config, _ = run
  with np.load(root / "nsp" / "tokens.npz") as f:
    indices = f["indices"]
  assert indices.shape == (512, 103)
  assert len(np.unique(indices[:, -64:])) >= 16   # a tokenizer that says something about the images


def test_next_scale_loss_falls(run):
  root, config, result = run
  with np.load(root / "nsp" / "tokens.npz") as f:
    tokens = {"indices": f["indices"], "labels": f["labels"]}
  batch = _held_out(config, tokens)
  graphdef, fresh = nnx.split(nsp.build_model(config.model, int(config.train.seed)))

  @jax.jit
  def ce(state):
    logits = nnx.merge(graphdef, state).nsp_logits(batch["labels"], batch["teacher_inputs"])
    return nsp.nsp_metrics(logits, batch["indices"], config.model.patch_nums)["ce_mean"]

  trained = checkpoint.restore_params(result["params"], nsp.build_model(config.model, 1))
  before, after = float(ce(fresh)), float(ce(nnx.state(trained)))
  # Next-scale training leaves an HMAR's masked-prediction branch as initialised.
  fresh_flat = dict(nnx.to_flat_state(nnx.state(nnx.merge(graphdef, fresh), nnx.Param)))
  for path, leaf in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
    if mask_finetune.in_mask_branch("/".join(map(str, path))):
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(fresh_flat[path]))
  print(f"next-scale held-out CE: {before:.3f} -> {after:.3f}")
  assert before == pytest.approx(np.log(64), abs=0.05)     # the official init predicts ~uniformly
  assert before - after > NSP_MARGIN
  assert [h["step"] for h in result["history"]] == list(range(25, NSP_STEPS + 1, 25))


def test_a_finished_run_restarts_from_its_checkpoint_without_training_again(run):
  root, config, first = run
  trained = nnx.state(checkpoint.restore_params(first["params"], nsp.build_model(config.model, 1)))
  again = nsp.train_nsp(config, str(root / "nsp"))
  assert again["history"] == []   # the checkpoint at num_steps was found: nothing left to do
  restored = nnx.state(checkpoint.restore_params(again["params"], nsp.build_model(config.model, 2)))
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = [json.loads(l) for l in open(root / "nsp" / "metrics.jsonl")]
  assert lines[-1]["step"] == NSP_STEPS


def test_masked_finetuning_loss_falls(run):
  root, nsp_config, result = run
  config = _config("train_hmar_tiny_mask.py")
  config.tokenizer.checkpoint = nsp_config.tokenizer.checkpoint
  config.data.num_examples = 512
  config.init_from = result["params"]
  config.data.tokens_cache = str(root / "nsp" / "tokens.npz")   # reuse the next-scale run's tokens
  config.train.num_steps = MASK_STEPS
  config.train.base_lr = 2.4e-2
  config.train.log_every = 50
  config.train.checkpoint_every = MASK_STEPS
  config.sample.grid_at_end = False
  with np.load(root / "nsp" / "tokens.npz") as f:
    tokens = {"indices": f["indices"], "labels": f["labels"]}
  batch = _held_out(config, tokens, with_mask_inputs=True)
  start = mask_finetune.load_next_scale_model(config)
  graphdef, start_state = nnx.split(start)
  loss_at_half = mask_finetune.mask_loss_fn(config.model.patch_nums, fixed_ratio=0.5,
                                            same_positions_for_batch=False)

  @jax.jit
  def masked_ce(state):
    model = nnx.merge(graphdef, state)
    model.cond_drop_rate = 0.0
    return loss_at_half(model, batch, jax.random.key(0))[1]["ce_masked"]

  out = mask_finetune.train_mask_finetune(config, str(root / "mask"))
  trained = checkpoint.restore_params(out["params"], mask_finetune.nsp.build_model(config.model, 1))
  before, after = float(masked_ce(start_state)), float(masked_ce(nnx.state(trained)))
  print(f"masked CE at p=0.5: {before:.3f} -> {after:.3f}")
  assert before - after > MASK_MARGIN
  # The next-scale part of the model is exactly the one finetuning started from.
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(start, nnx.Param)),
                            nnx.to_flat_state(nnx.state(trained, nnx.Param))):
    if not mask_finetune.in_mask_branch("/".join(map(str, p))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
