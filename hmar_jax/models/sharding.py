"""Placing ScaleTransformer parameters on a device mesh from their logical axis names.

Every parameter carries logical axis names (see blocks.py for the list); a rule table maps them
to mesh axes. Nothing in the model changes for sharding: shard the parameters with
`shard_params`, the batch with `batch_sharding`, and jit as usual (GSPMD propagates the rest).

  mesh = make_mesh((n_data, n_model), ("data", "model"))
  model = shard_params(model, mesh, FSDP_TP_RULES)

The mesh axes must be `AxisType.Auto` (GSPMD propagation; `make_mesh` does this). jax's own
`jax.make_mesh` defaults to Explicit axes, under which gathers such as the class-embedding
lookup would need out_sharding annotations in the model code.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import linen, nnx

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Data parallel only: every parameter replicated.
REPLICATED_RULES: Rules = ()
# FSDP over 'data' (weights split along the model width) plus tensor parallelism over 'model'
# (heads, MLP hidden, vocabulary and adaLN outputs split).
FSDP_TP_RULES: Rules = (("embed", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model"),
                        ("adaln", "model"))


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices=None) -> jax.sharding.Mesh:
  """A device mesh with Auto (GSPMD-propagated) axes."""
  auto = (jax.sharding.AxisType.Auto,) * len(axis_names)
  return jax.make_mesh(tuple(shape), tuple(axis_names), axis_types=auto, devices=devices)


def param_shardings(module: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
  """NamedShardings of the module's parameters (logical names mapped by `rules`; unnamed -> None)."""
  specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
  return linen.logical_to_mesh_sharding(specs, mesh, list(rules))


def shard_params(module: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.Module:
  """Moves the module's parameters onto `mesh` following `rules` (in place; returns the module)."""
  state = nnx.state(module, nnx.Param)
  shardings = param_shardings(module, mesh, rules)
  nnx.update(module, jax.device_put(state, shardings))
  return module


def batch_sharding(mesh: jax.sharding.Mesh, axis: str = "data") -> jax.sharding.NamedSharding:
  """Sharding of a batch-leading array over the mesh's `axis`."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
