"""Device meshes, logical-axis partitioning and multi-process start-up.

mesh.py          the (data, fsdp, tensor) mesh from a config, and the batch sharding
partitioning.py  logical axis names -> mesh axes, for parameters, optimiser state and activations
distributed.py   jax.distributed.initialize from the environment or explicit flags
"""

from hmar_jax.parallel.distributed import initialize_distributed, is_primary
from hmar_jax.parallel.mesh import (
  BATCH_AXES,
  DATA,
  FSDP,
  MESH_AXES,
  TENSOR,
  batch_sharding,
  make_mesh,
  mesh_shape_from_config,
  process_batch_rows,
  replicated,
)
from hmar_jax.parallel.partitioning import (
  RULE_SETS,
  LogicalRules,
  attention_in_shard_map,
  check_divisible,
  constrain,
  logical_names_tree,
  logical_to_mesh_spec,
  mesh_rules,
  row_major_on_gpu,
  tree_shardings,
)

__all__ = [
  "BATCH_AXES",
  "DATA",
  "FSDP",
  "TENSOR",
  "MESH_AXES",
  "batch_sharding",
  "make_mesh",
  "mesh_shape_from_config",
  "process_batch_rows",
  "replicated",
  "RULE_SETS",
  "LogicalRules",
  "attention_in_shard_map",
  "row_major_on_gpu",
  "constrain",
  "logical_to_mesh_spec",
  "mesh_rules",
  "tree_shardings",
  "check_divisible",
  "logical_names_tree",
  "initialize_distributed",
  "is_primary",
]
