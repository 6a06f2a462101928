"""Meshes and logical-axis rules: shapes resolve from the config, names map to mesh axes, and what
a mesh cannot split is refused or left whole."""

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from hmar_jax.parallel import (
  check_divisible,
  distributed,
  initialize_distributed,
  logical_to_mesh_spec,
  make_mesh,
  mesh_shape_from_config,
)
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


def _dist(**overrides):
  c = {
    "mode": "auto",
    "coordinator_address": "",
    "num_processes": 1,
    "process_id": 0,
    "local_device_ids": (),
    "initialization_timeout": 5,
  }
  c.update(overrides)
  return ml_collections.ConfigDict(c)


@pytest.fixture
def initialize_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False, raising=False)
  for name in (
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])  # no TPU chips attached
  return calls


def test_explicit_start_up_passes_the_coordinator_and_process(initialize_calls):
  assert initialize_distributed(
    _dist(mode="explicit", coordinator_address="host0:1234", num_processes=8, process_id=3, local_device_ids=(3,))
  )
  assert initialize_calls == [
    {
      "coordinator_address": "host0:1234",
      "num_processes": 8,
      "process_id": 3,
      "initialization_timeout": 5,
      "local_device_ids": [3],
    }
  ]


def test_a_plain_single_process_does_not_start_the_distributed_runtime(initialize_calls):
  assert not initialize_distributed(_dist())
  assert not initialize_distributed(_dist(mode="off", coordinator_address="host0:1234"))
  assert initialize_calls == []


def test_a_slurm_job_of_several_tasks_is_joined_from_its_environment(initialize_calls, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "42")
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert initialize_distributed(_dist())
  assert initialize_calls == [{"initialization_timeout": 5}]


def test_a_cloud_tpu_vm_is_joined_through_its_metadata(initialize_calls, monkeypatch):
  # Pod workers made by `gcloud compute tpus tpu-vm create` carry no cluster environment variables.
  monkeypatch.setattr(distributed.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
  monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
  assert initialize_distributed(_dist())
  assert initialize_calls == [{"initialization_timeout": 5}]


def test_tpu_chips_without_libtpu_are_not_a_cluster(initialize_calls, monkeypatch):
  monkeypatch.setattr(distributed.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
  monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
  assert not initialize_distributed(_dist())
