"""Official MAR diffusion-loss weights ('diffloss.*' of a MAR checkpoint) -> hmar_jax DiffLoss state.

Key map below `src_prefix` (W width, C target channels, Cz z channels; torch Linear weight (O, I) ->
NNX kernel (I, O), biases as they are):

  official key                                   shape           NNX path (below dst_prefix)
  net.time_embed.mlp.0.weight / .bias            (W, 256) / (W,) net.time_embed.mlp_in.kernel / .bias
  net.time_embed.mlp.2.weight / .bias            (W, W) / (W,)   net.time_embed.mlp_out.*
  net.cond_embed.weight / .bias                  (W, Cz) / (W,)  net.cond_embed.*
  net.input_proj.weight / .bias                  (W, C) / (W,)   net.input_proj.*
  net.res_blocks.{i}.in_ln.weight / .bias        (W,)            net.res_blocks.{i}.in_ln.scale / .bias
  net.res_blocks.{i}.mlp.0|2.weight / .bias      (W, W) / (W,)   net.res_blocks.{i}.mlp_in|mlp_out.*
  net.res_blocks.{i}.adaLN_modulation.1.weight   (3W, W)         net.res_blocks.{i}.ada_lin.kernel (+ .bias)
  net.final_layer.adaLN_modulation.1.weight      (2W, W)         net.final_layer.ada_lin.kernel (+ .bias)
  net.final_layer.linear.weight / .bias          (2C, W) / (2C,) net.final_layer.linear.*

The final LayerNorm has no affine parameters (no keys). The official module has no buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.convert.common import Entry, apply_plan, identity, linear_kernel
from hmar_jax.models.diffloss import FREQUENCY_DIM, DiffLoss


def diffloss_entries(
  src_prefix: str = "diffloss.",
  dst_prefix: tuple = (),
  *,
  depth: int,
  width: int,
  target_channels: int,
  z_channels: int,
) -> list[Entry]:
  """Plan entries of an official DiffLoss whose keys start with `src_prefix` -> the NNX DiffLoss
  state at path `dst_prefix` (e.g. ('diffloss',) inside a model holding it as .diffloss)."""
  dst_prefix = tuple(dst_prefix)
  w, c = width, target_channels

  def lin(src: str, dst: tuple, n_out: int, n_in: int) -> list[Entry]:
    path = dst_prefix + ("net",) + dst
    return [
      Entry(f"{src_prefix}net.{src}.weight", path + ("kernel",), (n_out, n_in), linear_kernel),
      Entry(f"{src_prefix}net.{src}.bias", path + ("bias",), (n_out,), identity),
    ]

  plan = lin("time_embed.mlp.0", ("time_embed", "mlp_in"), w, FREQUENCY_DIM)
  plan += lin("time_embed.mlp.2", ("time_embed", "mlp_out"), w, w)
  plan += lin("cond_embed", ("cond_embed",), w, z_channels)
  plan += lin("input_proj", ("input_proj",), w, c)
  for i in range(depth):
    src, dst = f"res_blocks.{i}", ("res_blocks", i)
    ln = dst_prefix + ("net",) + dst + ("in_ln",)
    plan += [
      Entry(f"{src_prefix}net.{src}.in_ln.weight", ln + ("scale",), (w,), identity),
      Entry(f"{src_prefix}net.{src}.in_ln.bias", ln + ("bias",), (w,), identity),
    ]
    plan += lin(f"{src}.mlp.0", dst + ("mlp_in",), w, w)
    plan += lin(f"{src}.mlp.2", dst + ("mlp_out",), w, w)
    plan += lin(f"{src}.adaLN_modulation.1", dst + ("ada_lin",), 3 * w, w)
  plan += lin("final_layer.adaLN_modulation.1", ("final_layer", "ada_lin"), 2 * w, w)
  plan += lin("final_layer.linear", ("final_layer", "linear"), 2 * c, w)
  return plan


def _dims(module_or_config: Any) -> dict[str, Any]:
  """(depth, width, target_channels, z_channels, num_sampling_steps) of a DiffLoss or a MAR config."""
  m = module_or_config
  if isinstance(m, DiffLoss):
    return {
      "depth": len(m.net.res_blocks),
      "width": int(m.net.input_proj.kernel.shape[1]),
      "target_channels": m.in_channels,
      "z_channels": m.z_channels,
      "num_sampling_steps": m.num_sampling_steps,
    }
  if isinstance(m, Mapping) or hasattr(m, "keys"):
    keys = set(m.keys())
    mar_keys = {"diffloss_d", "diffloss_w", "vae_embed_dim", "patch_size", "decoder_embed_dim", "num_sampling_steps"}
    if mar_keys <= keys:
      return {
        "depth": m["diffloss_d"],
        "width": m["diffloss_w"],
        "target_channels": m["vae_embed_dim"] * m["patch_size"] ** 2,
        "z_channels": m["decoder_embed_dim"],
        "num_sampling_steps": m["num_sampling_steps"],
      }
    raise ValueError(f"a MAR model config needs the keys {sorted(mar_keys)}; missing {sorted(mar_keys - keys)}")
  raise TypeError(f"expected a DiffLoss module or a MAR model config, got {type(m).__name__}")


def convert_diffloss_state_dict(
  state_dict: Mapping[str, np.ndarray],
  module_or_config: Any,
  *,
  src_prefix: str = "",
  source_name: str = "state_dict",
) -> nnx.State:
  """Official DiffLoss state_dict -> the nnx.State (Params) of the matching hmar_jax DiffLoss.

  state_dict: {key: array}; every key must be a DiffLoss key (below `src_prefix`, '' for a bare
  DiffLoss state_dict, 'diffloss.' for the head's keys alone taken from a MAR checkpoint).
  module_or_config: a DiffLoss (its sizes are used; it is not modified) or a MAR model config
  (diffloss_d, diffloss_w, vae_embed_dim, patch_size, decoder_embed_dim, num_sampling_steps).
  Apply with `nnx.update(module, state)`. Raises ConversionError naming missing, unexpected and
  mis-shaped keys.
  """
  dims = _dims(module_or_config)
  steps = dims.pop("num_sampling_steps")
  abstract = abstract_module(
    lambda rngs: DiffLoss(dims["target_channels"], dims["z_channels"], dims["depth"], dims["width"], steps, rngs=rngs)
  )
  target = nnx.state(abstract, nnx.Param)
  plan = diffloss_entries(src_prefix, (), **dims)
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  return apply_plan(sd, plan, target, source_name=source_name)
