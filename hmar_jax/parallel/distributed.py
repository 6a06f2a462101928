"""Multi-process start-up: one JAX process per host (TPU pod worker, GPU node or GPU).

`initialize_distributed(config.distributed)` calls `jax.distributed.initialize`:
  * with explicit coordinator_address / num_processes / process_id when the config gives them
    (a hand-started cluster, or several processes on one host, one per GPU);
  * with no arguments where JAX detects the cluster itself (TPU pods, Slurm, Open MPI), i.e. when
    `mode` is 'auto' and such an environment is present;
  * not at all for a plain single process.
Only the primary process (process 0) writes logs, sample grids and final parameters.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

# Environment variables by which jax.distributed recognises a cluster it can join on its own.
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM: libtpu installed and TPU chips attached. Its workers learn the slice from the
  metadata server, not from environment variables, so `jax.distributed.initialize()` is what joins
  them (it reads the metadata itself; one host alone becomes a cluster of one)."""
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")  # the devices JAX's TPU detection looks for
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _cluster_detected() -> bool:
  if _on_cloud_tpu_vm():
    return True
  if any(os.environ.get(k) for k in _CLUSTER_ENV):
    # One Slurm task on one node with one process is still a single process.
    return not (
      os.environ.get("SLURM_NTASKS", "2") == "1"
      and "SLURM_JOB_ID" in os.environ
      and not os.environ.get("TPU_WORKER_HOSTNAMES")
    )
  return False


def initialize_distributed(dist_config) -> bool:
  """Starts jax.distributed as `dist_config` says; returns whether it did.

  dist_config fields: mode ('auto' | 'explicit' | 'off'), coordinator_address ('host:port'),
  num_processes, process_id, local_device_ids (list or '' for all), initialization_timeout (s).
  Must run before anything touches the devices.
  """
  mode = dist_config.mode
  if mode == "off":
    return False
  if getattr(jax.distributed, "is_initialized", lambda: False)():
    return True
  if mode == "explicit" or dist_config.coordinator_address:
    kwargs = dict(
      coordinator_address=dist_config.coordinator_address,
      num_processes=int(dist_config.num_processes),
      process_id=int(dist_config.process_id),
      initialization_timeout=int(dist_config.initialization_timeout),
    )
    if dist_config.local_device_ids:
      kwargs["local_device_ids"] = [int(i) for i in dist_config.local_device_ids]
    jax.distributed.initialize(**kwargs)
    return True
  if _cluster_detected():
    jax.distributed.initialize(initialization_timeout=int(dist_config.initialization_timeout))
    return True
  return False


def is_primary() -> bool:
  """True in the process that writes files (process 0)."""
  return jax.process_index() == 0
