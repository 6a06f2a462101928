"""Hi-MAR: the two-stage masked-autoencoder backbone and its two diffusion heads, as one module.

The backbone (hmar_jax/models/himar.py) turns the low-resolution tokens into stage-1 features z1 and,
given z1 as pivots, the high-resolution tokens into stage-2 features z2; stage 1 is trained with MAR's
per-token MLP head (hmar_jax/models/diffloss.py, official 'diffloss.*'), stage 2 with the global
diffusion transformer (hmar_jax/models/dit_head.py, official 'cond_diffloss.*'). This module joins
them as the official `HiMAR.forward` does:

  1. stage-1 mask over the S low-res tokens (MAR's truncated-normal ratio), z1 = backbone.stage1;
     loss1 = the MLP head's hybrid loss averaged over the masked low-res tokens, the (B * S) rows
     repeated diffusion_batch_mul times with independent noise and timesteps (official forward_loss);
  2. pivots = stop_gradient(z1) (official small_z = z.clone().detach()); the placeholder replaces the
     pivots stage 1 saw and, on whole rows, those of a fraction 1 - step_stage2_rate * min(1, epoch /
     step_warmup) of the batch (`pivot_placeholder`); stage-2 mask over the L high-res tokens (cosine
     ratio with `cos`), z2 = backbone.stage2;
     loss2 = the DiT head's masked MSE, the batch repeated diffusion_batch_mul times (official
     global_forward_loss);
  3. loss = w1 * loss1 + w2 * loss2 with (w1, w2) = config.stage_loss_weights (default (0.4, 0.6)).

Two fields are added to the model config when absent (`himar_model_config`): stage_loss_weights and
gdm_num_sampling_steps, the DiT head's sampling respacing (official GlobalDiffLoss: always '250',
whatever --num_sampling_steps says; num_sampling_steps sizes only the MLP head's sampler).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.models.dense_attention import cudnn_unsupported
from hmar_jax.models.diffloss import DiffLoss
from hmar_jax.models.dit_head import SAMPLING_STEPS, DiTHead
from hmar_jax.models.himar import (
  STAGE_LOSS_WEIGHTS,
  HiMARBackbone,
  check_himar_config,
  high_res_len,
  low_res_len,
  pivot_placeholder,
  stage1_training_capacity,
  stage1_training_mask,
  stage2_training_capacity,
  stage2_training_mask,
)
from hmar_jax.models.mar import attn_implementation, seq_hw, token_embed_dim

PARAMS_KIND = "hmar_jax.himar"

# Model-config fields this wrapper reads that himar_config may not define, with their defaults.
# stage_loss_weights: the paper's 0.4 / 0.6. (The official HiMAR.forward returns (2.0 * loss1,
# 0.75 * loss2) and engine_mar.py weighs them by the token counts 64 / 320 and 256 / 320, which gives
# the same 0.4 / 0.6; here the weights are applied once, to the unscaled head losses.)
MODEL_DEFAULTS = {"stage_loss_weights": STAGE_LOSS_WEIGHTS, "gdm_num_sampling_steps": SAMPLING_STEPS}


def himar_model_config(config) -> ml_collections.ConfigDict:
  """A copy of the Hi-MAR model config (or of a full config's .model) with `MODEL_DEFAULTS` filled in."""
  config = config.model if "model" in config else config
  d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  for name, value in MODEL_DEFAULTS.items():
    d.setdefault(name, value)
  # one spelling whatever the source (a stored config comes back from JSON with a list)
  d["stage_loss_weights"] = tuple(float(w) for w in d["stage_loss_weights"])
  d["gdm_num_sampling_steps"] = str(d["gdm_num_sampling_steps"])
  return ml_collections.ConfigDict(d)


def check_himar_model_config(config) -> None:
  """Raises one ValueError naming the first bad field of a Hi-MAR model config (defaults filled in)."""
  check_himar_config(config)
  w = config.stage_loss_weights
  if len(w) != 2 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
    raise ValueError(
      f"Hi-MAR config: stage_loss_weights must be two finite non-negative numbers, not both 0, got {tuple(w)}"
    )
  h, w_ = seq_hw(config)
  if h != w_:
    raise ValueError(f"Hi-MAR config: the global head needs a square token grid, got {h} x {w_}")
  for name in ("gdm_d", "gdm_w", "head"):
    if int(config[name]) < 1:
      raise ValueError(f"Hi-MAR config: {name} must be >= 1, got {config[name]}")
  why = cudnn_unsupported(config.dtype, int(config.gdm_w) // int(config.head), dropout=False)
  if attn_implementation(config) == "cudnn" and why:
    raise ValueError(f"Hi-MAR config: attn_implementation 'cudnn' cannot run the DiT head: {why}")
  if int(config.gdm_w) % int(config.head):
    raise ValueError(f"Hi-MAR config: gdm_w {config.gdm_w} is not divisible by head {config.head}")


class HiMARModel(nnx.Module):
  """backbone: HiMARBackbone; diffloss: DiffLoss, the stage-1 MLP head ('diffloss.*'); cond_diffloss:
  DiTHead, the stage-2 global head ('cond_diffloss.*': gdm_d x gdm_w, `head` heads, mlp_ratio `ratio`,
  a grid of the high-res token side, gdm_num_sampling_steps sampling steps)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    config = himar_model_config(config)
    check_himar_model_config(config)
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.backbone = HiMARBackbone(config, rngs=rngs)
    self.diffloss = DiffLoss(
      token_embed_dim(config),
      int(config.decoder_embed_dim),
      int(config.diffloss_d),
      int(config.diffloss_w),
      str(config.num_sampling_steps),
      bool(config.grad_checkpointing),
      dtype=dtype,
      rngs=rngs,
    )
    self.cond_diffloss = DiTHead(
      token_embed_dim(config),
      int(config.decoder_embed_dim),
      int(config.gdm_d),
      int(config.gdm_w),
      int(config.head),
      float(config.ratio),
      seq_hw(config)[0],
      config.gdm_num_sampling_steps,
      dtype=dtype,
      attn_implementation=attn_implementation(config),
      rngs=rngs,
    )
    self.diffusion_batch_mul = int(config.diffusion_batch_mul)
    self.stage_loss_weights = tuple(config.stage_loss_weights)
    self.capacity_stage1 = stage1_training_capacity(config)
    self.capacity_stage2 = stage2_training_capacity(config)
    self.num_classes = int(config.class_num)

  @property
  def low_len(self) -> int:
    return low_res_len(self.config)

  @property
  def high_len(self) -> int:
    return high_res_len(self.config)

  @property
  def token_dim(self) -> int:
    return self.backbone.token_embed_dim

  def loss(
    self,
    high_tokens: jax.Array,
    low_tokens: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    epoch,
    train: bool = True,
  ):
    """The official two-stage training loss of one batch (module docstring).

    Args:
      high_tokens: (B, L, token_dim) float, the scaled VAE latents of the image, patchified.
      low_tokens: (B, S, cond_dim) float, those of the image downsized to cond_scale tokens a side.
      labels: (B,) int.
      key: PRNG key: both masks, the placeholder rows, label drop and dropout of each stage (when
        `train`), and both heads' diffusion noise and timesteps.
      epoch: the (fractional) training epoch, a Python number or a traced float: sets the fraction
        of rows whose pivots all take the placeholder (`pivot_placeholder`).
      train: dropout and random label drop on; False gives the loss without them (the placeholder
        rule, part of the training objective, applies either way).
    Returns:
      (scalar loss, metrics {'loss', 'loss_stage1', 'loss_stage2', 'mask_ratio_stage1',
      'mask_ratio_stage2'}); the stage losses are the heads' unweighted losses.
    """
    b = high_tokens.shape[0]
    if low_tokens.shape[0] != b:
      raise ValueError(f"high_tokens has {b} rows but low_tokens has {low_tokens.shape[0]}")
    c, s, mul = self.config, self.low_len, self.diffusion_batch_mul
    k_mask1, k_mask2, k_place, k_stage1, k_stage2, k_diff1, k_diff2 = jax.random.split(key, 7)

    # stage 1: the low-resolution tokens with the MLP head
    mask1 = stage1_training_mask(k_mask1, b, c)
    z1 = self.backbone.stage1(low_tokens, mask1, labels, key=k_stage1 if train else None, capacity=self.capacity_stage1)
    target1 = jnp.tile(low_tokens.reshape(b * s, -1).astype(jnp.float32), (mul, 1))
    loss1 = self.diffloss.loss(
      target1, jnp.tile(z1.reshape(b * s, -1), (mul, 1)), k_diff1, jnp.tile(mask1.reshape(-1), (mul,))
    )

    # stage 2: the high-resolution tokens with the global head, stage-1 features as (detached) pivots
    placeholder = pivot_placeholder(k_place, mask1, epoch, c)
    mask2 = stage2_training_mask(k_mask2, b, c)
    z2 = self.backbone.stage2(
      high_tokens,
      mask2,
      labels,
      pivots=jax.lax.stop_gradient(z1),
      placeholder=placeholder,
      key=k_stage2 if train else None,
      capacity=self.capacity_stage2,
    )
    target2 = jnp.tile(high_tokens.astype(jnp.float32), (mul, 1, 1))
    loss2 = self.cond_diffloss.loss(target2, jnp.tile(z2, (mul, 1, 1)), jnp.tile(mask2, (mul, 1)), k_diff2)

    w1, w2 = self.stage_loss_weights
    loss = w1 * loss1 + w2 * loss2
    metrics = {
      "loss": loss,
      "loss_stage1": loss1,
      "loss_stage2": loss2,
      "mask_ratio_stage1": jnp.mean(mask1),
      "mask_ratio_stage2": jnp.mean(mask2),
    }
    return loss, metrics


def abstract_himar(config: ml_collections.ConfigDict) -> HiMARModel:
  """A HiMARModel of ShapeDtypeStructs (no memory, no compute): for shapes and restoring into."""
  return abstract_module(lambda rngs: HiMARModel(config, rngs=rngs))


def save_himar(directory: str | os.PathLike, model_or_params, config, *, extra_metadata: Mapping | None = None) -> str:
  """Writes Hi-MAR parameters (a HiMARModel or its pure dict) and the model config (defaults filled
  in) to a new directory."""
  from hmar_jax import checkpoint

  meta = {"kind": PARAMS_KIND, "model": himar_model_config(config).to_dict()}
  meta.update(extra_metadata or {})
  return checkpoint.save_params(directory, model_or_params, metadata=meta)


def load_himar(directory: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> HiMARModel:
  """Loads a checkpoint of `save_himar` (a trained or converted Hi-MAR) with no random initialisation.

  config: the architecture; default the one stored with the parameters (a given one must match
  them: a mismatch names the differing keys)."""
  from hmar_jax import checkpoint

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Hi-MAR checkpoint directory {os.fspath(directory)} does not exist")
  meta = checkpoint.load_metadata(directory)
  if meta.get("kind") != PARAMS_KIND:
    raise ValueError(
      f"{os.fspath(directory)} holds a {meta.get('kind')!r} checkpoint, not Hi-MAR parameters ({PARAMS_KIND!r})"
    )
  if config is None:
    config = ml_collections.ConfigDict(meta["model"])
  graphdef, state = nnx.split(abstract_himar(config))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)  # host zeros, filled by restore_params
  return checkpoint.restore_params(directory, nnx.merge(graphdef, state))
