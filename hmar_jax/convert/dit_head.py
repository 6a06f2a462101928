"""Official Hi-MAR stage-2 head weights ('cond_diffloss.*' of a Hi-MAR checkpoint) -> hmar_jax DiTHead state.

Key map below `src_prefix` (W width, C target channels, Cz z channels, M = int(W * mlp_ratio),
L = grid_size ** 2; torch Linear weight (O, I) -> NNX kernel (I, O); the 1x1 Conv2d weights of the
patch embeddings (W, I, 1, 1) -> kernel (I, W)):

  official key                                     shape              NNX path (below dst_prefix)
  net.x_embedder.proj.weight / .bias               (W, C, 1, 1) / (W,) net.x_embedder.proj.kernel / .bias
  net.t_embedder.mlp.0.weight / .bias              (W, 256) / (W,)    net.t_embedder.mlp_in.*
  net.t_embedder.mlp.2.weight / .bias              (W, W) / (W,)      net.t_embedder.mlp_out.*
  net.c_embedder.proj.weight / .bias               (W, Cz, 1, 1) / (W,) net.c_embedder.proj.*
  net.blocks.{i}.attn.qkv.weight / .bias           (3W, W) / (3W,)    net.blocks.{i}.attn.qkv.*
  net.blocks.{i}.attn.proj.weight / .bias          (W, W) / (W,)      net.blocks.{i}.attn.proj.*
  net.blocks.{i}.mlp.fc1.weight / .bias            (M, W) / (M,)      net.blocks.{i}.mlp.fc1.*
  net.blocks.{i}.mlp.fc2.weight / .bias            (W, M) / (W,)      net.blocks.{i}.mlp.fc2.*
  net.blocks.{i}.adaLN_modulation.1.weight / .bias (6W, W) / (6W,)    net.blocks.{i}.ada_lin.*
  net.final_layer.adaLN_modulation.1.weight / .bias (2W, W) / (2W,)   net.final_layer.ada_lin.*
  net.final_layer.linear.weight / .bias            (C, W) / (C,)      net.final_layer.linear.*

The LayerNorms have no affine parameters (no keys). Buffers, checked and not stored
(`check_dit_head_buffers`): net.pos_embed (1, L, W) must be the fixed 2-D sin-cos table the module
computes (hmar_jax.models.dit_head.sincos_pos_embed_2d; a checkpoint of another width or grid fails
here); net.c_pos_embed (1, L, W) must be present with that shape, its values are not used (the
official forward does not add it). A converter of the whole Hi-MAR model pops the buffers with
`check_dit_head_buffers(sd, 'cond_diffloss.', ...)` and adds `dit_head_entries('cond_diffloss.',
('cond_diffloss',), ...)` to its plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.convert.common import ConversionError, Entry, apply_plan, identity, linear_kernel
from hmar_jax.models.dit_head import FREQUENCY_DIM, GRID_SIZE, DiTHead, sincos_pos_embed_2d

DEFAULT_PREFIX = "cond_diffloss."
POS_EMBED_ATOL = 1e-5  # the official table is float64 rounded to float32: the two agree to ~1e-7
SIZE_KEYS = ("target_channels", "z_channels", "depth", "width", "num_heads")


def conv1x1_kernel(x: np.ndarray) -> np.ndarray:
  """PyTorch 1x1 Conv2d weight (O, I, 1, 1) -> NNX Linear kernel (I, O)."""
  return np.transpose(x[:, :, 0, 0], (1, 0))


def dit_head_entries(
  src_prefix: str = DEFAULT_PREFIX,
  dst_prefix: tuple = (),
  *,
  depth: int,
  width: int,
  target_channels: int,
  z_channels: int,
  mlp_ratio: float = 4.0,
) -> list[Entry]:
  """Plan entries of an official GlobalDiffLoss whose keys start with `src_prefix` -> the NNX
  DiTHead state at path `dst_prefix` (parameters only; see `check_dit_head_buffers`)."""
  dst_prefix = tuple(dst_prefix)
  w, c, hidden = width, target_channels, int(width * mlp_ratio)

  def lin(src: str, dst: tuple, n_out: int, n_in: int, conv: bool = False) -> list[Entry]:
    path = dst_prefix + ("net",) + dst
    shape, transform = ((n_out, n_in, 1, 1), conv1x1_kernel) if conv else ((n_out, n_in), linear_kernel)
    return [
      Entry(f"{src_prefix}net.{src}.weight", path + ("kernel",), shape, transform),
      Entry(f"{src_prefix}net.{src}.bias", path + ("bias",), (n_out,), identity),
    ]

  plan = lin("x_embedder.proj", ("x_embedder", "proj"), w, c, conv=True)
  plan += lin("t_embedder.mlp.0", ("t_embedder", "mlp_in"), w, FREQUENCY_DIM)
  plan += lin("t_embedder.mlp.2", ("t_embedder", "mlp_out"), w, w)
  plan += lin("c_embedder.proj", ("c_embedder", "proj"), w, z_channels, conv=True)
  for i in range(depth):
    src, dst = f"blocks.{i}", ("blocks", i)
    plan += lin(f"{src}.attn.qkv", dst + ("attn", "qkv"), 3 * w, w)
    plan += lin(f"{src}.attn.proj", dst + ("attn", "proj"), w, w)
    plan += lin(f"{src}.mlp.fc1", dst + ("mlp", "fc1"), hidden, w)
    plan += lin(f"{src}.mlp.fc2", dst + ("mlp", "fc2"), w, hidden)
    plan += lin(f"{src}.adaLN_modulation.1", dst + ("ada_lin",), 6 * w, w)
  plan += lin("final_layer.adaLN_modulation.1", ("final_layer", "ada_lin"), 2 * w, w)
  plan += lin("final_layer.linear", ("final_layer", "linear"), c, w)
  return plan


def check_dit_head_buffers(sd: dict, src_prefix: str, *, width: int, grid_size: int = GRID_SIZE) -> list[str]:
  """Pops the official buffers net.pos_embed / net.c_pos_embed (below `src_prefix`) from `sd` and
  returns the problems found (empty if all fine)."""
  problems = []
  shape = (1, grid_size * grid_size, width)
  for name in ("pos_embed", "c_pos_embed"):
    key = f"{src_prefix}net.{name}"
    if key not in sd:
      problems.append(f"missing buffer {key}")
      continue
    x = np.asarray(sd.pop(key))
    if x.shape != shape:
      problems.append(f"buffer {key}: has shape {x.shape}, expected {shape}")
    elif name == "pos_embed":
      if not np.all(np.isfinite(x)):
        problems.append(f"buffer {key} holds non-finite values")
      elif not np.allclose(x[0], sincos_pos_embed_2d(width, grid_size), rtol=0, atol=POS_EMBED_ATOL):
        problems.append(
          f"buffer {key} is not the fixed 2-D sin-cos table of width {width} on a {grid_size}x{grid_size} grid"
        )
  return problems


def _sizes(module_or_sizes: Any) -> dict[str, Any]:
  """DiTHead constructor arguments of a DiTHead or of a mapping of them."""
  m = module_or_sizes
  if isinstance(m, DiTHead):
    net = m.net
    return {
      "target_channels": m.in_channels,
      "z_channels": m.z_channels,
      "depth": len(net.blocks),
      "width": net.width,
      "num_heads": net.num_heads,
      "mlp_ratio": net.mlp_ratio,
      "grid_size": net.grid_size,
      "num_sampling_steps": m.num_sampling_steps,
    }
  if isinstance(m, Mapping):
    missing = [k for k in SIZE_KEYS if k not in m]
    if missing:
      raise ValueError(f"DiTHead sizes need the keys {list(SIZE_KEYS)}; missing {missing}")
    return dict(m)
  raise TypeError(f"expected a DiTHead module or a mapping of its sizes, got {type(m).__name__}")


def convert_dit_head_state_dict(
  state_dict: Mapping[str, np.ndarray],
  module_or_sizes: Any,
  *,
  src_prefix: str = "",
  source_name: str = "state_dict",
) -> nnx.State:
  """Official GlobalDiffLoss state_dict -> the nnx.State (Params) of the matching hmar_jax DiTHead.

  state_dict: {key: array}, every key below `src_prefix` ('' for a bare GlobalDiffLoss state_dict,
  'cond_diffloss.' for the head's keys alone taken from a Hi-MAR checkpoint).
  module_or_sizes: a DiTHead (its sizes are used; it is not modified) or a mapping of the DiTHead
  constructor arguments (target_channels, z_channels, depth, width, num_heads; optional
  mlp_ratio, grid_size, num_sampling_steps). Apply with `nnx.update(module, state)`.
  Raises ConversionError naming missing, unexpected and mis-shaped keys and bad buffers.
  """
  sizes = _sizes(module_or_sizes)
  abstract = abstract_module(lambda rngs: DiTHead(**sizes, rngs=rngs))
  target = nnx.state(abstract, nnx.Param)
  plan = dit_head_entries(
    src_prefix,
    (),
    depth=sizes["depth"],
    width=sizes["width"],
    target_channels=sizes["target_channels"],
    z_channels=sizes["z_channels"],
    mlp_ratio=sizes.get("mlp_ratio", 4.0),
  )
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  buffer_problems = check_dit_head_buffers(
    sd, src_prefix, width=sizes["width"], grid_size=sizes.get("grid_size", GRID_SIZE)
  )
  try:
    state = apply_plan(sd, plan, target, source_name=source_name)
  except ConversionError as e:
    if buffer_problems:
      raise ConversionError(f"{e}\nbuffer problems:\n  " + "\n  ".join(buffer_problems)) from None
    raise
  if buffer_problems:
    raise ConversionError(f"{source_name}: buffer problems:\n  " + "\n  ".join(buffer_problems))
  return state
