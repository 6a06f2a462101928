"""Meshes and logical-axis rules: shapes resolve from the config, names map to mesh axes, and what
a mesh cannot split is refused or left whole."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from hmar_jax.parallel import check_divisible, logical_to_mesh_spec, make_mesh, mesh_shape_from_config
from hmar_jax.parallel.partitioning import FSDP_TP_RULES


@pytest.mark.parametrize(
  "shape, devices, want",
  [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 4, 2), 8, (1, 4, 2)),
  ],
)
def test_mesh_shape_resolves_the_rest(shape, devices, want):
  assert mesh_shape_from_config(shape, devices) == want


@pytest.mark.parametrize(
  "shape, message",
  [
    ((2, 2), "must have 3 entries"),
    ((-1, -1, 1), "at most one -1"),
    ((3, -1, 1), "not divisible by 3"),
    ((2, 2, 1), "needs 4 devices, but 8"),
    ((0, 1, 1), "positive or -1"),
  ],
)
def test_a_mesh_that_does_not_use_the_devices_is_refused(shape, message):
  with pytest.raises(ValueError, match=message):
    mesh_shape_from_config(shape, 8)


class FakeMesh:
  def __init__(self, **sizes):
    self.shape = sizes


def test_parameters_follow_fsdp_and_megatron_rules():
  mesh = FakeMesh(data=2, fsdp=2, tensor=2)
  assert logical_to_mesh_spec(("embed", None, "heads"), FSDP_TP_RULES, mesh, (64, 3, 64)) == P("fsdp", None, "tensor")
  assert logical_to_mesh_spec(("heads", "embed"), FSDP_TP_RULES, mesh, (64, 64)) == P("tensor", "fsdp")
  assert logical_to_mesh_spec(("layers", "embed", "mlp"), FSDP_TP_RULES, mesh, (4, 64, 256)) == P(
    None, "fsdp", "tensor"
  )


def test_activations_split_the_batch_over_both_data_axes():
  mesh = FakeMesh(data=2, fsdp=4, tensor=1)
  assert logical_to_mesh_spec(("act_batch", "act_length", "act_embed"), FSDP_TP_RULES, mesh, (16, 10, 64)) == P(
    ("data", "fsdp")
  )


def test_a_dimension_the_mesh_does_not_divide_stays_whole():
  mesh = FakeMesh(data=1, fsdp=2, tensor=2)
  assert logical_to_mesh_spec(("classes", "embed"), FSDP_TP_RULES, mesh, (11, 64)) == P(None, "fsdp")
  assert logical_to_mesh_spec(("embed", "vocab"), FSDP_TP_RULES, mesh, (63, 64)) == P(None, "tensor")
  # Axes of size 1 are left out of the spec altogether.
  assert logical_to_mesh_spec(("embed", "heads"), FSDP_TP_RULES, FakeMesh(data=8, fsdp=1, tensor=1), (64, 64)) == P()


def test_batch_and_heads_the_mesh_cannot_split_are_refused():
  with pytest.raises(ValueError, match="not divisible by the 8 data shards"):
    check_divisible(12, 4, {"data": 2, "fsdp": 4, "tensor": 1})
  with pytest.raises(ValueError, match="num_heads 3 is not divisible by mesh tensor = 2"):
    check_divisible(8, 3, {"data": 2, "fsdp": 1, "tensor": 2})


def test_make_mesh_names_its_axes():
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == 1
