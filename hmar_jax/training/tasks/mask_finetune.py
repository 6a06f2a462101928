"""HMAR masked-prediction finetuning (official finetune.py, mp_trainer.py, models/mp.py).

  python -m hmar_jax.train --config=configs/hmar_mask.py:tiny --workdir=runs/hmar_mask \\
      --config.init_from=runs/hmar_nsp/params

Starts from a trained next-scale HMAR (config.init_from). When that checkpoint has no masked
branch (a next-scale run's params), the last N next-scale blocks and the head are copied into it
(`ScaleTransformer.init_mask_branch_from_next_scale`; official MaskedPrediction loads the whole
next-scale state_dict); a checkpoint that has one continues from it. Only the branch trains (mask
embedding, mask head and its adaLN, the N mask blocks); everything else is held as frozen
parameters: no gradients, no optimiser state, and no backward pass through the shared blocks.

Each step draws p ~ U(0, 1) and masks ceil(p * pn**2) tokens of every scale but the 1x1
(training/masking.py). The input of scale k is W f_hat(<k) + where(mask, mask_embed, W
contribution_k) + b; the loss is the cross entropy on masked positions only, averaged over them
(official 'mask_unweighted').
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hmar_jax.models.transformer import MASK_BRANCH
from hmar_jax.training import masking
from hmar_jax.training.flops import transformer_step_flops
from hmar_jax.training.tasks.next_scale import NextScaleTask, cross_entropy, overlay, split_maps
from hmar_jax.training.trees import merge_trees, split_tree


def in_mask_branch(name: str) -> bool:
  """The trainable set: mask embedding, mask head(+adaLN) and the mask blocks."""
  return name.split("/", 1)[0] in MASK_BRANCH


def masked_mean_cross_entropy(
  logits: jax.Array, targets: jax.Array, mask: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean CE over masked positions: (B, N, V), (B, N), (B, N) bool -> scalar (0 if nothing is masked)."""
  ce = cross_entropy(logits, targets, label_smoothing)
  m = mask.astype(jnp.float32)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def mask_loss(
  model,
  batch,
  key,
  patch_nums: Sequence[int],
  *,
  label_smoothing: float = 0.0,
  same_positions_for_batch: bool = True,
  fixed_ratio: float | None = None,
) -> tuple[jax.Array, dict]:
  """Masked-prediction loss and metrics.

  batch: 'labels' (B,), 'indices' (B, L), 'teacher_inputs' and 'mask_inputs' (B, L - first_l, Cvae).
  fixed_ratio: use this p instead of drawing p ~ U(0, 1) (evaluation).
  """
  patch_nums = tuple(int(p) for p in patch_nums)
  first_l = patch_nums[0] ** 2
  k_ratio, k_mask, k_model = jax.random.split(key, 3)
  labels = batch["labels"]
  p = masking.draw_mask_ratio(k_ratio) if fixed_ratio is None else jnp.float32(fixed_ratio)
  mask = masking.draw_token_mask(
    k_mask, patch_nums, labels.shape[0], p, same_positions_for_batch=same_positions_for_batch
  )
  logits = model.mp_logits(labels, batch["teacher_inputs"], batch["mask_inputs"], mask, train=True, key=k_model)
  targets = batch["indices"][:, first_l:]
  loss = masked_mean_cross_entropy(logits, targets, mask, label_smoothing)
  sg = jax.lax.stop_gradient(logits)
  hit = (jnp.argmax(sg, -1) == targets).astype(jnp.float32) * mask
  metrics = {
    "ce_masked": masked_mean_cross_entropy(sg, targets, mask),
    "acc_masked": 100 * hit.sum() / jnp.maximum(mask.sum(), 1),
    "mask_ratio": p,
  }
  return loss, metrics


class MaskFinetuneTask(NextScaleTask):
  """Trains the masked-prediction branch of an HMAR model; the rest is frozen."""

  name = "mask_finetune"

  @staticmethod
  def make_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(config.model.to_dict())
    m.patch_nums = tuple(m.patch_nums)
    return m

  def init_variables(self, key, pretrained=None) -> dict:
    params, rest = self._split_model(key)
    has_branch = False
    if pretrained is not None:
      loaded = pretrained["params"]
      has_branch = any(k in loaded for k in MASK_BRANCH)
      params = overlay(params, loaded, self.config.init_from)
    if not has_branch:
      model = self.model(params, rest)
      model.init_mask_branch_from_next_scale()
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    trainable, frozen = split_tree(params, in_mask_branch)
    return {"params": trainable, "frozen": frozen, "model_vars": rest, "extra": {}}

  def variable_names(self) -> dict:
    names = super().variable_names()["params"]
    trainable, frozen = split_tree(names, in_mask_branch)
    return {"params": trainable, "frozen": frozen}

  def prepare_batch(self, batch, frozen) -> dict:
    q_def, q_state = self._quantizer
    q = nnx.merge(q_def, q_state)
    maps = split_maps(batch["indices"], self.patch_nums)
    return {
      "labels": batch["labels"],
      "indices": batch["indices"],
      "teacher_inputs": q.teacher_forcing_inputs(maps),
      "mask_inputs": q.scale_contributions(maps),
    }

  def loss(self, params, state, batch, key):
    model = self.model(merge_trees(params, state.frozen), state.model_vars)
    loss, metrics = mask_loss(
      model,
      batch,
      key,
      self.patch_nums,
      label_smoothing=float(self.config.loss.label_smoothing),
      same_positions_for_batch=bool(self.config.loss.same_mask_positions_for_batch),
    )
    return loss, metrics, {}

  def step_flops(self, batch_size: int) -> float:
    return transformer_step_flops(self.model_config, images=batch_size, branch="mp", trained="mask")

  def tokens_per_example(self) -> int:
    return sum(p * p for p in self.patch_nums[1:])

  def progress_fields(self) -> tuple[str, ...]:
    return ("ce_masked", "acc_masked")
