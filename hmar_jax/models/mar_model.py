"""MAR: the masked-autoencoder backbone and its diffusion head, as one module.

The backbone (hmar_jax/models/mar.py) turns (tokens, mask, labels) into a condition z per token;
the head (hmar_jax/models/diffloss.py) owns the loss and the sampling rule of a token given z. This
module only joins them, as the official `MAR.forward` / `forward_loss` does: the batch of masked
tokens is repeated `diffusion_batch_mul` times with independent diffusion noise and timesteps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.models.diffloss import DiffLoss
from hmar_jax.models.mar import (
  MARBackbone,
  check_mar_config,
  mask_ratio,
  num_masked_tokens,
  random_mask,
  sample_orders,
  token_embed_dim,
  training_capacity,
)


class MARModel(nnx.Module):
  """backbone: MARBackbone; diffloss: DiffLoss (official parameter prefixes 'diffloss.net.*')."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    check_mar_config(config)
    self.backbone = MARBackbone(config, rngs=rngs)
    self.diffloss = DiffLoss(
      token_embed_dim(config),
      int(config.decoder_embed_dim),
      int(config.diffloss_d),
      int(config.diffloss_w),
      str(config.num_sampling_steps),
      bool(config.grad_checkpointing),
      dtype=jnp.dtype(config.dtype),
      rngs=rngs,
    )
    self.diffusion_batch_mul = int(config.diffusion_batch_mul)
    self.mask_ratio_min = float(config.mask_ratio_min)
    self.capacity = training_capacity(config)
    self.num_classes = int(config.class_num)

  @property
  def seq_len(self) -> int:
    return self.backbone.seq_len

  @property
  def token_dim(self) -> int:
    return self.backbone.token_embed_dim

  def loss(self, tokens: jax.Array, labels: jax.Array, key: jax.Array, *, train: bool = True):
    """The official training loss of one batch.

    Args:
      tokens: (B, L, token_dim) float, the scaled VAE latents patchified.
      labels: (B,) int.
      key: PRNG key: random orders, the batch's mask ratio, label drop and dropout (when `train`),
        and the diffusion noise and timesteps.
    Returns:
      (scalar loss, metrics {'loss', 'mask_ratio'}).
    """
    b, n, _ = tokens.shape
    k_order, k_ratio, k_backbone, k_diff = jax.random.split(key, 4)
    orders = sample_orders(k_order, b, n)
    ratio = mask_ratio(k_ratio, self.mask_ratio_min)  # one ratio per batch, as officially
    mask = random_mask(orders, num_masked_tokens(ratio, n))
    z = self.backbone(tokens, mask, labels, key=k_backbone if train else None, capacity=self.capacity)
    mul = self.diffusion_batch_mul
    target = jnp.tile(tokens.reshape(b * n, -1).astype(jnp.float32), (mul, 1))
    z = jnp.tile(z.reshape(b * n, -1), (mul, 1))
    loss = self.diffloss.loss(target, z, k_diff, jnp.tile(mask.reshape(b * n), (mul,)))
    return loss, {"loss": loss, "mask_ratio": jnp.mean(mask)}


PARAMS_KIND = "hmar_jax.mar"


def abstract_mar(config: ml_collections.ConfigDict) -> MARModel:
  """A MARModel of ShapeDtypeStructs (no memory, no compute): for shapes and restoring into."""
  return abstract_module(lambda rngs: MARModel(config, rngs=rngs))


def save_mar(directory: str | os.PathLike, model_or_params, config, *, extra_metadata: Mapping | None = None) -> str:
  """Writes MAR parameters (a MARModel or its pure dict) and the model config to a new directory."""
  from hmar_jax import checkpoint

  meta = {"kind": PARAMS_KIND, "model": config.to_dict()}
  meta.update(extra_metadata or {})
  return checkpoint.save_params(directory, model_or_params, metadata=meta)


def load_mar(directory: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> MARModel:
  """Loads a checkpoint of `save_mar` (a trained or converted MAR) with no random initialisation.

  config: the architecture; default the one stored with the parameters (a given one must match
  them: a mismatch names the differing keys)."""
  from hmar_jax import checkpoint

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"MAR checkpoint directory {os.fspath(directory)} does not exist")
  meta = checkpoint.load_metadata(directory)
  if meta.get("kind") != PARAMS_KIND:
    raise ValueError(f"{directory} holds a {meta.get('kind')!r} checkpoint, not MAR parameters ({PARAMS_KIND!r})")
  if config is None:
    config = ml_collections.ConfigDict(meta["model"])
  graphdef, state = nnx.split(abstract_mar(config))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)  # host zeros, filled by restore_params
  return checkpoint.restore_params(directory, nnx.merge(graphdef, state))
