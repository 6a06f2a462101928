"""Logical axis names -> mesh axes, for parameters, optimiser state and activations.

Parameters carry logical axis names on their nnx variables (see hmar_jax/models/blocks.py); the
model's activations are annotated with names of their own (prefix 'act_'), so a rule table maps
both (maxtext's logical_axis_rules). With the default table on a (data, fsdp, tensor) mesh:

  parameters   'embed' -> fsdp (FSDP: every matrix split along the model width); 'heads', 'mlp',
               'vocab', 'adaln' -> tensor (Megatron: qkv / fc1 / head split by columns, proj / fc2
               by rows); 'layers' (the scan axis), 'classes', 'levels', 'length', 'cvae' unsplit.
  activations  'act_batch' -> (data, fsdp); 'act_heads', 'act_mlp', 'act_vocab' -> tensor.

A dimension that a mesh axis does not divide stays whole (e.g. an 11-row class table on 2 devices),
and a parameter with no names at all (the tokenizer's convolutions) has its largest dimension that
fsdp divides split over fsdp (big_vision's FSDP rule), so every task shards without model edits.

The attention kernels are custom calls that XLA cannot partition, so the model runs them under
`shard_map` (`attention_in_shard_map`): batch over data x fsdp, heads over tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hmar_jax.parallel.mesh import BATCH_AXES, FSDP, TENSOR

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

FSDP_TP_RULES: LogicalRules = (
  # parameters
  ("embed", FSDP),
  ("heads", TENSOR),
  ("mlp", TENSOR),
  ("vocab", TENSOR),
  ("adaln", TENSOR),
  ("layers", None),
  ("classes", None),
  ("levels", None),
  ("length", None),
  ("cvae", None),
  # activations
  ("act_batch", BATCH_AXES),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", TENSOR),
  ("act_mlp", TENSOR),
  ("act_vocab", TENSOR),
)
# Everything replicated except the batch (plain data parallelism whatever the mesh says).
DATA_PARALLEL_RULES: LogicalRules = (("act_batch", BATCH_AXES),)

RULE_SETS: dict[str, LogicalRules] = {"fsdp_tp": FSDP_TP_RULES, "data_parallel": DATA_PARALLEL_RULES}

# Unnamed parameters smaller than this stay replicated (splitting a bias costs more than it saves).
MIN_ELEMENTS_TO_SHARD = 2**12


def mesh_rules(name: str) -> LogicalRules:
  if name not in RULE_SETS:
    raise ValueError(f"mesh.rules must be one of {sorted(RULE_SETS)}, got {name!r}")
  return RULE_SETS[name]


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(int(mesh.shape[a]) for a in axes)


def logical_to_mesh_spec(
  names: Sequence[str | None] | None, rules: LogicalRules, mesh=None, shape: Sequence[int] | None = None
) -> PartitionSpec:
  """PartitionSpec of mesh axes for a tuple of logical names.

  Unknown names and None stay unsplit; a mesh axis is used at most once (first come); with `mesh`
  and `shape`, a dimension its mesh axes do not divide stays unsplit.
  """
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    if axes is not None:
      tup = (axes,) if isinstance(axes, str) else tuple(axes)
      tup = tuple(a for a in tup if a not in used and (mesh is None or a in mesh.shape))
      if mesh is not None:
        tup = tuple(a for a in tup if int(mesh.shape[a]) > 1)
      if mesh is not None and shape is not None and tup and shape[i] % _axis_size(mesh, tup):
        tup = ()
      used.update(tup)
      axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
    out.append(axes)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def _largest_fsdp_dim(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  n = int(mesh.shape.get(FSDP, 1))
  if n <= 1 or math.prod(shape) < MIN_ELEMENTS_TO_SHARD:
    return PartitionSpec()
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % n == 0:
      return PartitionSpec(*([None] * i + [FSDP]))
  return PartitionSpec()


def logical_names_tree(variables: nnx.State) -> dict:
  """Pure dict of each variable's logical names (a tuple, or None where it has none)."""

  def names(v):
    meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")

  flat = {}
  for path, var in nnx.to_flat_state(variables):
    flat[path] = names(var)
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = NamesLeaf(value)
  return tree


class NamesLeaf:
  """A leaf wrapper so that tuples of names are not flattened as pytrees."""

  __slots__ = ("names",)

  def __init__(self, names):
    self.names = None if names is None else tuple(names)

  def __repr__(self):
    return f"Names{self.names}"


def tree_shardings(abstract: Any, mesh: Mesh, rules: LogicalRules, names: Any | None = None) -> Any:
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs.

  names: an optional tree of the same structure whose leaves are `NamesLeaf` (from
  `logical_names_tree`) or None; leaves without names get the fallback FSDP rule.
  """

  def one(x, n=None):
    shape = tuple(getattr(x, "shape", ()))
    logical = getattr(n, "names", None)
    if logical is not None and len(logical) == len(shape):
      spec = logical_to_mesh_spec(logical, rules, mesh, shape)
    elif rules is DATA_PARALLEL_RULES or not shape:
      spec = PartitionSpec()
    else:
      spec = _largest_fsdp_dim(shape, mesh)
    return NamedSharding(mesh, spec)

  if names is None:
    return jax.tree.map(one, abstract)
  return jax.tree.map(one, abstract, names, is_leaf=lambda x: isinstance(x, NamesLeaf) or x is None)


# ----------------------------------------------------------------------------- activations


def _active_rules() -> LogicalRules:
  rules = flax_spmd.get_logical_axis_rules()
  return rules if rules else FSDP_TP_RULES


def _context_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under the current mesh (`jax.set_mesh`); a no-op without one."""
  mesh = _context_mesh()
  if mesh is None:
    return x
  spec = logical_to_mesh_spec(names, _active_rules(), mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def attention_in_shard_map(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Runs `fn(q, k, v) -> o`, all (B, L, H, D), per device under `shard_map` when a mesh is set.

  Batch over the rules' 'act_batch' axes, heads over 'act_heads'; a dimension those axes do not
  divide is left whole (each device then computes it all, e.g. a batch of 1 while sampling).
  """
  mesh = _context_mesh()
  if mesh is None:
    return fn(q, k, v)
  rules = _active_rules()
  spec = logical_to_mesh_spec(("act_batch", None, "act_heads", None), rules, mesh, q.shape)
  if all(s is None for s in spec):
    return fn(q, k, v)
  return jax.shard_map(fn, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _pin_row_major(v: jax.Array) -> jax.Array:
  row_major = Layout(tuple(range(v.ndim)))
  return jax.lax.platform_dependent(v, cuda=lambda v: with_layout_constraint(v, row_major), default=lambda v: v)


def row_major_on_gpu(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x unchanged, its layout pinned to row-major (last axis fastest) when compiled for CUDA GPUs.

  Why: XLA's GPU layout assignment gave the HMAR blocks' float32 residual stream (B, N, C) a
  batch-fastest layout, carried over from the small adaLN products, so every LayerNorm read it
  transposed and its matmul inputs and gradients were copied into other layouts (the d24 train
  step's transposing copies took an eighth of it; pinned, the step runs 7% faster). A layout
  constraint is a custom call that sharding propagation cannot see through (the operand would be
  gathered), so under a mesh it runs per device inside `shard_map`, with specs from the logical
  `names`. Elsewhere (CPU, TPU) it is the identity.
  """
  mesh = _context_mesh()
  if mesh is None:
    return _pin_row_major(x)
  spec = logical_to_mesh_spec(names, _active_rules(), mesh, x.shape)
  if all(s is None for s in spec):
    return _pin_row_major(x)
  return jax.shard_map(_pin_row_major, in_specs=spec, out_specs=spec)(x)


def check_divisible(
  batch_size: int, num_heads: int | None, mesh_shape: Mapping[str, int], what: str = "train.batch_size"
) -> None:
  """Raises ValueError when the mesh cannot split the batch (data x fsdp) or the heads (tensor)."""
  shards = int(mesh_shape.get("data", 1)) * int(mesh_shape.get(FSDP, 1))
  if batch_size % shards:
    raise ValueError(
      f"{what} {batch_size} is not divisible by the {shards} data shards "
      f"(mesh data x fsdp = {mesh_shape.get('data', 1)} x {mesh_shape.get(FSDP, 1)})"
    )
  tensor = int(mesh_shape.get(TENSOR, 1))
  if num_heads is not None and num_heads % tensor:
    raise ValueError(f"model.num_heads {num_heads} is not divisible by mesh tensor = {tensor}")
