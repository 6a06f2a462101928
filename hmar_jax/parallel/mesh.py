"""The training mesh: axes (data, fsdp, tensor), shape from the config.

  data    pure data parallelism: parameters replicated, batch split
  fsdp    data parallelism with parameters and optimiser state split (ZeRO-3 / FSDP)
  tensor  Megatron-style tensor parallelism: heads, MLP hidden and vocabulary split

The batch is split over data x fsdp. Axes are `AxisType.Auto`, so XLA's sharding propagation places
what the annotations leave open (maxtext and flax examples/lm1b do the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over both data-parallel axes


def mesh_shape_from_config(shape: Sequence[int], num_devices: int | None) -> tuple[int, ...]:
  """Resolves a (data, fsdp, tensor) shape with at most one -1 ('the rest of the devices').

  Raises ValueError naming the problem when the shape does not use exactly `num_devices`
  (with num_devices None, only the form of the shape is checked and it is returned as is).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape entries must be positive or -1 (the rest), got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape may have at most one -1, got {shape}")
  if num_devices is None:
    return shape
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh.shape {shape} needs {math.prod(shape)} devices, but {num_devices} are available (use -1 for 'the rest')"
    )
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes over `devices` (default: all devices of all processes).

  `jax.make_mesh` orders the devices so that the fastest links (ICI / NVLink) serve the last axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_from_config(shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError):
    # Device kinds without a known physical topology (e.g. forced host devices in some orders).
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch: split over data x fsdp, rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def process_batch_rows(sharding: jax.sharding.Sharding, batch_size: int, process_index: int) -> np.ndarray:
  """The rows of a (batch_size, ...) array that the devices of process `process_index` hold, sorted.

  Read from the sharding itself (each device's index, grouped by the device's process), so it holds
  for every mesh: a tensor axis spanning processes makes them hold (and read) the same rows, and a
  process whose devices hold non-adjacent batch shards gets all of them. Returns (R,) int64.
  """
  rows: set[int] = set()
  for device, index in sharding.devices_indices_map((int(batch_size),)).items():
    if device.process_index == process_index:
      rows.update(range(*index[0].indices(int(batch_size))))
  return np.asarray(sorted(rows), np.int64)


def data_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return int(mesh.shape[DATA] * mesh.shape[FSDP])
