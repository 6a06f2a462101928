"""What a training task supplies to the shared trainer, and the state the trainer keeps.

A task (tokenizer, next-scale prediction, masked finetuning, ...) is one class: its model's
variables, its loss, its batch preparation and its data. The trainer (hmar_jax/training/trainer.py)
owns everything else: the mesh and shardings, the optimiser, stepping, gradient accumulation,
EMA, metrics, checkpoints, preemption and progress.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import ml_collections
import numpy as np


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (all arrays; saved whole in checkpoints).

  step:        int32 (), optimiser steps taken.
  params:      the parameters the optimiser trains (nested dict of arrays).
  frozen:      parameters the task uses but does not train by gradient (may be empty).
  model_vars:  the model's non-parameter variables (e.g. codebook usage, batch statistics).
  opt_state:   the optax state of `params`.
  ema_params:  exponential moving average of `params`, or None.
  rng:         uint32 key data (2,), split once per step.
  extra:       task state that is neither (e.g. codebook EMA statistics, the discriminator).
  halted_at:   int32 (): -1, or the first step whose loss or gradient was not finite. From then
               on the step leaves the state unchanged, so the last good state can be saved.
  """

  step: jax.Array
  params: Any
  frozen: Any
  model_vars: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  extra: Any
  halted_at: jax.Array

  def as_dict(self) -> dict:
    """The checkpointed tree (None fields dropped)."""
    d = {
      "step": self.step,
      "params": self.params,
      "frozen": self.frozen,
      "model_vars": self.model_vars,
      "opt_state": self.opt_state,
      "rng": self.rng,
      "extra": self.extra,
      "halted_at": self.halted_at,
    }
    if self.ema_params is not None:
      d["ema_params"] = self.ema_params
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> TrainState:
    return cls(
      step=d["step"],
      params=d["params"],
      frozen=d["frozen"],
      model_vars=d["model_vars"],
      opt_state=d["opt_state"],
      ema_params=d.get("ema_params"),
      rng=d["rng"],
      extra=d["extra"],
      halted_at=d["halted_at"],
    )


class Task:
  """Base class of training tasks. Subclasses override the methods marked 'required'.

  Constructed as Task(config, workdir); `config` passed hmar_jax.training.schema.validate.
  """

  name = "task"
  # Top-level parameter names whose leaves carry a leading scan axis (weight-decay rule).
  stacked_groups: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir

  # ---------------------------------------------------------------- model (required)
  def init_variables(self, key: jax.Array, pretrained: Mapping | None = None) -> dict:
    """{'params', 'frozen', 'model_vars', 'extra'}: nested dicts of arrays (pure; run under jit).

    pretrained: what `load_pretrained` returned (arrays to put in place of the fresh ones).
    """
    raise NotImplementedError

  def variable_names(self) -> dict:
    """Logical axis names of the variables: the same four keys, trees of
    hmar_jax.parallel.partitioning.NamesLeaf (or None for unnamed leaves)."""
    return {}

  def load_pretrained(self) -> Mapping | None:
    """Host (numpy) arrays to start from (e.g. config.init_from), or None."""
    return None

  # ---------------------------------------------------------------- step (required: loss)
  def prepare_batch(self, batch: Mapping[str, jax.Array], frozen: Any) -> dict:
    """On-device batch preparation inside the jitted step (e.g. tokenizer inputs from token maps)."""
    return dict(batch)

  def loss(
    self, params: Any, state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array
  ) -> tuple[jax.Array, dict, dict]:
    """(scalar loss to minimise, metrics, aux), differentiated with respect to `params`.

    state: the step's input state, read-only (frozen, model_vars, extra, step).
    aux['model_vars'], if present, replaces the model's non-parameter variables; aux['per_example']
    holds batch-leading arrays (rejoined across micro-batches); all of aux reaches `after_update`.
    """
    raise NotImplementedError

  def after_update(
    self, state: TrainState, aux: Mapping, batch: Mapping[str, jax.Array], key: jax.Array, tx
  ) -> tuple[TrainState, dict]:
    """Non-gradient updates after the optimiser step (codebook EMA, a discriminator...); `state` is
    the updated state (its step already incremented), tx the optimiser of `params`."""
    return state, {}

  def leaner_step(self) -> str | None:
    """Called when the compiled step would not fit in device memory: switches the model to a
    configuration that holds less for the backward pass (a remat policy) and names it, or returns
    None when there is none to switch to. The parameters' shapes must not change."""
    return None

  def begin(self, state: TrainState, *, fresh: bool, gather) -> None:
    """Called once before the first step; `gather(state)` gives host copies (collective)."""

  # ---------------------------------------------------------------- data (required)
  def train_source(self):
    """grain random-access source of host records for training (dicts of numpy arrays)."""
    raise NotImplementedError

  def example_shapes(self) -> dict[str, tuple[int, ...]]:
    """Per-example shape of each batch field the step reads (checked before anything compiles)."""
    return {}

  # ---------------------------------------------------------------- accounting
  def step_flops(self, batch_size: int) -> float | None:
    """Model FLOPs of one training step on `batch_size` examples (for MFU), or None."""
    return None

  def progress_fields(self) -> tuple[str, ...]:
    """Metric names shown on the progress bar."""
    return ("loss",)

  def metric_weights(self) -> dict[str, str]:
    """Metrics averaged over micro-batches with a weight named in aux (default: plain mean)."""
    return {}

  # ---------------------------------------------------------------- end of training
  def finish(self, state: TrainState, host_state: Mapping[str, Any] | None, *, primary: bool) -> dict:
    """Writes the task's outputs (final weights, images). host_state: the params / ema / frozen /
    model_vars as numpy on every process (None when not gathered). Returns paths and figures."""
    return {}


def numpy_tree(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)
