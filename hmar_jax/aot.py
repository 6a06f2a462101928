"""Compiling a training step for TPU slices this machine does not have (ahead of time).

  python -m hmar_jax.aot --config=configs/hmar.py:d24 --topology=v5p:4x4x4 --config.train.batch_size=768
  python -m hmar_jax.aot --config=configs/var.py:d16 --topology=v5e:4x8 --config.mesh.shape='(-1,1,1)'
  python -m hmar_jax.aot --config=configs/hmar_mask.py:d16 --topology=v5p:2x2x1 --sampler=64

The TPU compiler (XLA and Mosaic, shipped in libtpu: `pip install "jax[tpu]"`) runs on any host
against a topology's device descriptions (`jax.experimental.topologies`), as maxtext's
train_compile does. The full sharded step of the shared trainer is lowered for abstract arrays (no
parameter is created) and compiled; printed: the mesh, the per-chip memory the compiled step needs
(arguments, outputs, temporaries, total against the chip's HBM), its FLOPs and bytes per chip, and a
roofline estimate of step time and images/s from the chip's published peak bf16 FLOP/s and HBM
bandwidth (an upper bound: it ignores communication and kernel efficiency). A step that does not
fit ends with one `error:` line and the numbers (exit status 2). With --sampler=N every program the
sampler of the config's model runs (per scale: next-scale step, masked steps, update; decoding) is
compiled instead, at N images per chip, and the largest one's memory per chip is printed.

Attention runs as the Pallas TPU kernels (`model.attn_implementation='pallas_tpu'` unless the
config asks for 'xla'); distributed start-up is off (one process describes the whole slice).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import shutil
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from hmar_jax.abstract import abstract_module
from hmar_jax.parallel import batch_sharding
from hmar_jax.training import schema

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published per-chip figures (Google Cloud TPU documentation, 'System architecture' tables)."""

  name: str
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float


# Keyed by jax Device.device_kind. Sources: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e.
CHIPS = {
  "TPU v4": ChipSpec("v4", 275e12, 32 * GIB, 1200e9),
  "TPU v5 lite": ChipSpec("v5e", 197e12, 16 * GIB, 819e9),
  "TPU v5": ChipSpec("v5p", 459e12, 95 * GIB, 2765e9),
  "TPU v6 lite": ChipSpec("v6e", 918e12, 32 * GIB, 1640e9),
}

# dtype of each batch field a task's step reads (shapes come from Task.example_shapes).
BATCH_DTYPES = {"image": np.uint8, "indices": np.int32, "labels": np.int32}


class AotError(ValueError):
  """The compile cannot be attempted (no libtpu, unknown topology) or its result does not fit."""


def tpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str) -> list:
  """TPU device descriptions of `topology` (e.g. 'v5p:2x2x1', 'v5e:4x4', 'v6e:2x2')."""
  if not tpu_available():
    raise AotError('compiling for TPU needs libtpu: pip install "jax[tpu]" (it runs on a CPU host)')
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # the TPU client reports a bad name as INVALID_ARGUMENT with its own text
    raise AotError(f"unknown or unsupported TPU topology {topology!r}: {str(e).splitlines()[0]}") from e


def chip_spec(devices: list) -> ChipSpec | None:
  return CHIPS.get(devices[0].device_kind)


def compile_attention(topology: str, patch_nums, pattern: str, dtype, head_dim: int, *, batch: int = 1, heads: int = 2):
  """Forward and backward of the Pallas TPU scale attention compiled for one chip of `topology`.

  Raises AotError naming the pattern, shapes, dtype and chip when Mosaic (or XLA) refuses it.
  """
  import pallas_kernels

  device = tpu_devices(topology)[0]
  length = sum(int(p) ** 2 for p in patch_nums)
  x = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype, sharding=jax.sharding.SingleDeviceSharding(device))

  def loss(q, k, v):
    out = pallas_kernels.scale_attention(q, k, v, tuple(patch_nums), pattern, implementation="pallas_tpu")
    return out.astype(np.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x)
  try:
    return lowered.compile()
  except Exception as e:
    raise AotError(
      f"the TPU compiler refused the {pattern} scale attention (L={length}, {heads} heads, head dim {head_dim}, "
      f"{np.dtype(dtype).name}, forward and backward) for {device.device_kind} ({topology}): "
      f"{str(e).splitlines()[0]}"
    ) from e


def _abstract_batch(trainer, batch_size: int) -> dict:
  shapes = trainer.task.example_shapes()
  unknown = sorted(set(shapes) - set(BATCH_DTYPES))
  if unknown:
    raise AotError(f"no batch dtype known for fields {unknown} (hmar_jax.aot.BATCH_DTYPES)")
  return {
    name: jax.ShapeDtypeStruct(
      (batch_size, *shape), BATCH_DTYPES[name], sharding=batch_sharding(trainer.mesh, 1 + len(shape))
    )
    for name, shape in shapes.items()
  }


def compile_train_step(config: ml_collections.ConfigDict, devices: list):
  """The trainer's jitted step compiled for `devices` (abstract: nothing is allocated).

  Returns (compiled, trainer). `config` is copied and set up for ahead-of-time use (Pallas TPU
  attention, no distributed start-up); its checks run first, before anything is traced.
  """
  # the trainer imports the data stack; only needed here
  from hmar_jax.training.trainer import Trainer, is_out_of_memory

  config = ml_collections.ConfigDict(config.to_dict())
  config.distributed.mode = "off"
  # HMAR / VAR scale attention runs as the Pallas TPU kernels; MAR / Hi-MAR's dense attention
  # ('auto') resolves to XLA's on any backend but a GPU.
  is_scale_model = config.model.get("family", "hmar") not in ("mar", "himar")
  if is_scale_model and "attn_implementation" in config.model and config.model.attn_implementation != "xla":
    config.model.attn_implementation = "pallas_tpu"
  workdir = tempfile.mkdtemp(prefix="hmar_jax_aot_")
  if not config.get("init_from", "x"):
    # The schema asks masked finetuning for the folder of its starting weights; the abstract state
    # never reads them, so any existing folder does.
    config.init_from = workdir
  try:
    trainer = Trainer(config, workdir, devices=devices)
    chip = chip_spec(devices)
    # The fit check of compile_step (remat 'auto') against the chip's HBM: abstract devices report none.
    trainer.memory_limit_bytes = chip.hbm_bytes if chip is not None else None
    # Outside the mesh context: the PRNG keys and optax's state template are made eagerly, on this
    # host's default device (inside it, eager work would be sent to the abstract TPU devices); the
    # trainer keeps both for compile_step.
    trainer.state_shardings(trainer.abstract_state())
    with trainer.mesh_context():
      batch = _abstract_batch(trainer, int(config.train.batch_size))
    try:
      compiled = trainer.compile_step(batch)
    except Exception as e:  # the TPU compiler refuses a program whose buffers exceed HBM
      if not is_out_of_memory(e):
        raise
      raise AotError(
        f"the step does not fit a {devices[0].device_kind} chip at global batch {config.train.batch_size} on "
        f"mesh {dict(trainer.mesh.shape)}: {str(e).splitlines()[0]}; use more chips, a smaller batch, remat "
        "or FSDP (config.mesh.shape)"
      ) from e
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return compiled, trainer


def compile_sampler(
  config: ml_collections.ConfigDict,
  devices: list,
  batch_per_chip: int = 64,
  *,
  mask_schedule: str | None = None,
  cfg: float = 1.5,
  top_k: int = 900,
  top_p: float = 0.96,
):
  """Every program the sampler runs (each scale's next-scale step, masked steps, update, decode),
  compiled for `devices` as the sampler runs them, for one sampling run's shapes.

  The model of `config.model` and the tokenizer of `config.tokenizer.config` are built abstractly
  (nothing is allocated); their weights are replicated, the batch (`batch_per_chip` x chips images)
  is split over all the chips, and attention runs as the Pallas TPU kernels under shard_map.
  `mask_schedule`: None = the config's sample.mask_schedule ('default' for HMAR models with a
  masked branch, else 'none' when the config has none). Returns ([(piece name, compiled)], mesh),
  the pieces in the order the sampler first calls them (decode last).
  """
  from flax import nnx

  from hmar_jax.models.transformer import ScaleTransformer
  from hmar_jax.parallel import make_mesh, mesh_rules, replicated
  from hmar_jax.sampling import Sampler, validate_mask_schedule
  from hmar_jax.tokenizer.vqvae import VQVAE

  if isinstance(batch_per_chip, bool) or not isinstance(batch_per_chip, int) or batch_per_chip < 1:
    raise AotError(f"batch_per_chip must be a positive int, got {batch_per_chip!r}")
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  if model_config.get("attn_implementation", "auto") != "xla":
    model_config.attn_implementation = "pallas_tpu"
  model = abstract_module(lambda rngs: ScaleTransformer(model_config, rngs=rngs))
  vqvae = abstract_module(lambda rngs: VQVAE(config.tokenizer.config, rngs=rngs))
  sampler = Sampler(model, vqvae)
  if mask_schedule is None:
    mask_schedule = config.get("sample", {}).get("mask_schedule", "none")
  schedule = validate_mask_schedule(mask_schedule, model.patch_nums)  # before anything is traced
  mesh = make_mesh((len(devices), 1, 1), devices)
  batch = batch_per_chip * len(devices)
  rep, split = replicated(mesh), batch_sharding(mesh, 1)

  # Trace one sampling run abstractly, recording each compiled piece's call (the sampler runs them
  # as separate programs: one per scale and kind), then compile every distinct call for the slice:
  # the weights replicated, the batch (and the doubled guidance batch) split over the chips.
  calls: dict = {}
  jit_piece = sampler._compiled
  traced = copy.copy(sampler)

  def recording(name, fn, static_argnames=(), donate_argnames=()):
    piece = jit_piece(name, fn, static_argnames, donate_argnames)

    def place(a, weights: bool) -> jax.ShapeDtypeStruct:
      batched = not weights and a.ndim and a.shape[0] in (batch, 2 * batch)
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=split if batched else rep)

    def call(*args, **static):
      placed = []
      for x in args:
        weights = x is traced._model_state or x is traced._vq_state
        placed.append(jax.tree.map(lambda a, w=weights: place(a, w), x))
      shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(placed))  # one program per shape set
      calls.setdefault((name, tuple(sorted(static.items())), shapes), (piece, placed, static))
      return piece(*args, **static)

    return call

  traced._compiled = recording
  traced._jit = {}

  def sample(model_state, vq_state, labels):
    traced._model_state, traced._vq_state = model_state, vq_state
    return traced.sample(labels, jax.random.key(0), cfg=cfg, top_k=top_k, top_p=top_p, mask_schedule=schedule)

  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  rules = mesh_rules(config.get("mesh", {}).get("rules", "fsdp_tp"))
  pieces = []
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    jax.eval_shape(
      sample, abstract(sampler._model_state), abstract(sampler._vq_state), jax.ShapeDtypeStruct((batch,), np.int32)
    )
    for (name, static, _), (piece, args, kwargs) in calls.items():
      label = name + "".join(f" {k}={v}" for k, v in static)
      try:
        pieces.append((label, piece.lower(*args, **kwargs).compile()))
      except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        raise AotError(
          f"the sampler's {label} does not fit a {devices[0].device_kind} chip at {batch_per_chip} images per "
          f"chip: {str(e).splitlines()[0]}"
        ) from e
  return pieces, mesh


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def step_report(compiled, devices: list, global_batch: int, model_flops: float | None = None) -> dict:
  """Per-chip memory, FLOPs and bytes of a compiled SPMD step, and the roofline estimate.

  The compiled program is the one each chip runs, so its memory and cost analyses are per chip.
  XLA's cost analysis counts a loop body once (a scanned stack of blocks: one block) and a Pallas
  kernel as nothing, so with `model_flops` (the step's model FLOPs, all chips) the compute bound
  comes from those, and the memory bound, which the same undercount affects, is left out.
  """
  mem = compiled.memory_analysis()
  args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  code = int(mem.generated_code_size_in_bytes)
  total = args + out - alias + temp + code  # donated arguments are reused for outputs (alias)
  cost = _cost(compiled)
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  chip = chip_spec(devices)
  report: dict[str, Any] = {
    "chips": len(devices),
    "device_kind": devices[0].device_kind,
    "global_batch": global_batch,
    "argument_gib": args / GIB,
    "output_gib": out / GIB,
    "alias_gib": alias / GIB,
    "temp_gib": temp / GIB,
    "total_gib": total / GIB,
    "flops_per_chip": flops,
    "bytes_per_chip": nbytes,
  }
  if model_flops:
    report["model_flops_per_chip"] = model_flops / len(devices)
  if chip is not None:
    if model_flops:
      t_compute, t_memory = model_flops / len(devices) / chip.peak_bf16_flops, 0.0
    else:
      t_compute, t_memory = flops / chip.peak_bf16_flops, nbytes / chip.hbm_bytes_per_s
    step_s = max(t_compute, t_memory)
    report.update(
      chip=chip.name,
      hbm_gib=chip.hbm_bytes / GIB,
      fits=total <= chip.hbm_bytes,
      roofline_step_s=step_s,
      bound="compute" if t_compute >= t_memory else "memory",
      roofline_img_s=global_batch / step_s if step_s > 0 else None,
    )
  return report


def format_report(report: dict, mesh_shape: dict) -> str:
  lines = [
    f"mesh            {dict(mesh_shape)} over {report['chips']} x {report['device_kind']}",
    f"global batch    {report['global_batch']}",
    "memory per chip "
    f"{report['total_gib']:.2f} GiB (arguments {report['argument_gib']:.2f}, outputs {report['output_gib']:.2f}, "
    f"aliased {report['alias_gib']:.2f}, temporaries {report['temp_gib']:.2f})"
    + (f" of {report['hbm_gib']:.0f} GiB HBM" if "hbm_gib" in report else ""),
    f"XLA cost        {report['flops_per_chip'] / 1e12:.2f} TFLOP, {report['bytes_per_chip'] / 1e9:.1f} GB accessed per "
    "chip (a scanned loop's body counted once, Pallas kernels not at all)",
  ]
  if "model_flops_per_chip" in report:
    lines.append(
      f"model FLOPs     {report['model_flops_per_chip'] / 1e12:.2f} TFLOP per chip (hmar_jax.training.flops)"
    )
  if "roofline_step_s" in report:
    lines.append(
      f"roofline        {1e3 * report['roofline_step_s']:.1f} ms per step ({report['bound']}-bound), "
      f"{report['roofline_img_s']:.0f} img/s at most"
    )
  return "\n".join(lines)


def main_with(config: ml_collections.ConfigDict, topology: str) -> dict:
  schema.validate(config)  # before the TPU client starts
  devices = tpu_devices(topology)
  t0 = time.time()
  compiled, trainer = compile_train_step(config, devices)
  seconds = time.time() - t0
  batch = int(config.train.batch_size)
  report = step_report(compiled, devices, batch, trainer.task.step_flops(batch))
  report.update(topology=topology, compile_s=seconds, mesh=dict(trainer.mesh.shape))
  print(format_report(report, trainer.mesh.shape))
  print(f"compiled in {seconds:.1f} s")
  if report.get("fits") is False:
    raise AotError(
      f"the step needs {report['total_gib']:.2f} GiB per chip, more than the {report['hbm_gib']:.0f} GiB of a "
      f"{report['chip']} chip: use more chips, a smaller batch, remat or FSDP (config.mesh.shape)"
    )
  return report


def sampler_report(pieces: list, devices: list, batch: int) -> dict:
  """The sampler's memory per chip: the largest of its programs (they run one after another)."""
  reports = {label: step_report(compiled, devices, batch) for label, compiled in pieces}
  label, worst = max(reports.items(), key=lambda kv: kv[1]["total_gib"])
  report = {k: v for k, v in worst.items() if not k.startswith(("flops", "bytes", "roofline", "bound"))}
  report.update(
    programs=len(pieces), largest_program=label, total_gib_by_program={k: r["total_gib"] for k, r in reports.items()}
  )
  return report


def sampler_main_with(config: ml_collections.ConfigDict, topology: str, batch_per_chip: int) -> dict:
  """Compiles the config's model's sampler (compile_sampler) and prints its memory per chip."""
  schema.validate(config)
  devices = tpu_devices(topology)
  t0 = time.time()
  pieces, mesh = compile_sampler(config, devices, batch_per_chip)
  seconds = time.time() - t0
  report = sampler_report(pieces, devices, batch_per_chip * len(devices))
  report.update(topology=topology, compile_s=seconds, mesh=dict(mesh.shape))
  print(f"sampler         {batch_per_chip} images per chip, mask schedule {config.sample.mask_schedule}")
  print(
    f"mesh            {dict(mesh.shape)} over {report['chips']} x {report['device_kind']}\n"
    f"programs        {report['programs']} (one per scale and kind), compiled in {seconds:.1f} s\n"
    f"memory per chip {report['total_gib']:.2f} GiB at most ({report['largest_program']}: weights "
    f"{report['argument_gib']:.2f}, temporaries {report['temp_gib']:.2f})"
    + (f" of {report['hbm_gib']:.0f} GiB HBM" if "hbm_gib" in report else "")
  )
  if report.get("fits") is False:
    raise AotError(
      f"the sampler needs {report['total_gib']:.2f} GiB per chip, more than the {report['hbm_gib']:.0f} GiB of a "
      f"{report['chip']} chip: fewer images per chip"
    )
  return report


def _main(argv):
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/NAME.py[:variant] is required")
  if _SAMPLER.value:
    sampler_main_with(_CONFIG.value, _TOPOLOGY.value, _SAMPLER.value)
  else:
    main_with(_CONFIG.value, _TOPOLOGY.value)


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  from hmar_jax import cli

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
  _TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:4x4x4, v5e:4x4, v6e:2x2.")
  _SAMPLER = flags.DEFINE_integer(
    "sampler", 0, "> 0: compile the sampler of the config's model at this many images per chip, not the train step."
  )
  cli.run(_main)
