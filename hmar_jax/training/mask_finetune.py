"""HMAR masked-prediction finetuning (official finetune.py, mp_trainer.py, models/mp.py).

  python -m hmar_jax.train --config=configs/train_hmar_tiny_mask.py --workdir=runs/hmar_mask

Starts from a trained next-scale HMAR (config.init_from: its params/ checkpoint), copies the
last N next-scale blocks and the head into the masked-prediction branch
(`ScaleTransformer.init_mask_branch_from_next_scale`) and trains only that branch: the mask
embedding, the mask head (and its adaLN) and the N mask blocks; every other parameter is
frozen through optax (set_to_zero, no optimiser state), so the next-scale model is unchanged.

Each step draws p ~ U(0, 1) and masks ceil(p * pn**2) tokens of every scale but the 1x1
(training/masking.py). The input of scale k is W f_hat(<k) + where(mask, mask_embed, W
contribution_k) + b; the loss is the cross entropy on masked positions only, averaged over
them (official 'mask_unweighted').
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from hmar_jax.training import masking, nsp, optim
from hmar_jax.training.state import create_train_state, cross_entropy, make_train_step


def masked_mean_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                              label_smoothing: float = 0.0) -> jax.Array:
  """Mean CE over masked positions: (B, N, V), (B, N), (B, N) bool -> scalar (0 if nothing is masked)."""
  ce = cross_entropy(logits, targets, label_smoothing)
  m = mask.astype(jnp.float32)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def mask_loss_fn(patch_nums: Sequence[int], *, label_smoothing: float = 0.0, same_positions_for_batch: bool = True,
                 fixed_ratio: float | None = None):
  """loss_fn(model, batch, key) for `make_train_step`.

  batch: 'labels' (B,), 'indices' (B, L), 'teacher_inputs' and 'mask_inputs' (B, L - first_l, Cvae).
  fixed_ratio: use this p instead of drawing p ~ U(0, 1) (evaluation).
  """
  first_l = int(patch_nums[0]) ** 2
  patch_nums = tuple(int(p) for p in patch_nums)

  def loss_fn(model, batch, key):
    k_ratio, k_mask, k_model = jax.random.split(key, 3)
    labels = batch["labels"]
    p = masking.draw_mask_ratio(k_ratio) if fixed_ratio is None else jnp.float32(fixed_ratio)
    mask = masking.draw_token_mask(k_mask, patch_nums, labels.shape[0], p,
                                   same_positions_for_batch=same_positions_for_batch)
    logits = model.mp_logits(labels, batch["teacher_inputs"], batch["mask_inputs"], mask, train=True, key=k_model)
    targets = batch["indices"][:, first_l:]
    loss = masked_mean_cross_entropy(logits, targets, mask, label_smoothing)
    hit = (jnp.argmax(jax.lax.stop_gradient(logits), -1) == targets).astype(jnp.float32) * mask
    metrics = {"ce_masked": masked_mean_cross_entropy(jax.lax.stop_gradient(logits), targets, mask),
               "acc_masked": 100 * hit.sum() / jnp.maximum(mask.sum(), 1), "mask_ratio": p}
    return loss, metrics

  return loss_fn


def in_mask_branch(name: str) -> bool:
  """The trainable set: mask embedding, mask head(+adaLN) and the mask blocks."""
  from hmar_jax.models.transformer import MASK_BRANCH
  return name.split("/", 1)[0] in MASK_BRANCH


def make_mask_train_step(patch_nums: Sequence[int], *, label_smoothing: float = 0.0,
                         same_positions_for_batch: bool = True, trainable=None):
  """The pure step `train_step(state, batch) -> (state, metrics)`."""
  return make_train_step(mask_loss_fn(patch_nums, label_smoothing=label_smoothing,
                                      same_positions_for_batch=same_positions_for_batch), trainable)


def load_next_scale_model(config: ml_collections.ConfigDict):
  """The HMAR model of config.model with next-scale weights from config.init_from, mask branch initialised."""
  from hmar_jax import checkpoint
  m = config.model
  if not m.get("mask_layers", 0) or m.pattern != "block_diagonal":
    raise ValueError("masked finetuning needs an HMAR model config (pattern 'block_diagonal', mask_layers > 0), "
                     f"got pattern={m.pattern!r}, mask_layers={m.get('mask_layers', 0)}")
  init_from = config.get("init_from", "")
  if not init_from:
    raise ValueError("config.init_from must name the next-scale model's parameter checkpoint (its workdir/params)")
  model = nsp.build_model(m, int(config.train.get("seed", 0)))
  checkpoint.restore_params(init_from, model)
  model.init_mask_branch_from_next_scale()
  return model


def train_mask_finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Masked finetuning (config.task == 'mask_finetune'); resumes from workdir/checkpoints.

  Writes workdir/tokens.npz, metrics.jsonl, checkpoints/, params/ (the full HMAR inference
  model: shared blocks, next-scale blocks and head, mask blocks, mask head, mask embedding) and,
  with config.sample.grid_at_end, samples.png sampled with config.sample.mask_schedule.
  """
  train = config.train
  os.makedirs(workdir, exist_ok=True)
  vqvae, tok_id = nsp.load_tokenizer(config)
  nsp.check_tokenizer_matches_model(vqvae, config.model)
  patch_nums = tuple(config.model.patch_nums)
  tokens = nsp.cached_tokens(workdir, vqvae, config.data, tok_id)
  model = load_next_scale_model(config)
  tx, sched = nsp.make_tx(train, in_mask_branch)
  state = create_train_state(model, tx, seed=int(train.get("seed", 0)), ema_decay=float(train.get("ema_decay", 0.0)))
  trainable = optim.trainable_mask(state.params, in_mask_branch)
  step = make_mask_train_step(patch_nums, label_smoothing=float(train.get("label_smoothing", 0.0)),
                              same_positions_for_batch=bool(train.get("same_mask_positions_for_batch", True)),
                              trainable=trainable)
  from hmar_jax.checkpoint import TrainCheckpointer
  with TrainCheckpointer(os.path.join(workdir, "checkpoints")) as c:
    start = int(c.latest_step() or 0)
  batches = nsp.batch_iterator(tokens, int(train.batch_size), int(train.get("seed", 0)), start)
  state, history = nsp.run_loop(
      state=state, train_step=step, batches=batches,
      input_fn=nsp.make_input_fn(vqvae.quantizer, with_mask_inputs=True), num_steps=int(train.num_steps),
      workdir=workdir, lr_fn=sched, log_every=int(train.get("log_every", 50)),
      checkpoint_every=int(train.get("checkpoint_every", 500)), max_to_keep=int(train.get("max_to_keep", 2)),
      desc="hmar masked finetune")
  path = nsp.save_final_params(workdir, state, config)
  return {"history": history, "params": path, "samples": nsp.maybe_write_samples(config, workdir, state, vqvae)}
