"""Functional training state for NNX models: pure `train_step(state, batch) -> (state, metrics)`.

The model is split once into a static graph definition and its parameters; the step merges
them back inside the traced function, so the step is a pure function of pytrees (it can be
jitted, sharded with in/out shardings, or checkpointed) and places nothing on devices itself.
Parameters stay float32; the compute dtype is the model's own (config.model.dtype).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  step: int32 scalar, optimiser steps taken.
  params: nnx.State of the model's nnx.Param variables (float32).
  rest: nnx.State of the model's other variables (carried along unchanged).
  opt_state: the optax state.
  ema_params: exponential moving average of params, or None when EMA is off.
  rng: raw uint32 PRNG key (2,), split every step (class dropout, drop path, masks).
  graphdef / tx / ema_decay: static.
  """
  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  graphdef: Any = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

  def model(self, params: Any | None = None) -> nnx.Module:
    """A module view of `params` (default: the trained ones); use inside or outside jit."""
    return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)

  def checkpoint_tree(self) -> dict:
    """The arrays to save (no static fields)."""
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
            "ema_params": self.ema_params, "rng": self.rng}

  def replace_from_checkpoint(self, tree: dict) -> "TrainState":
    return self.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                        ema_params=tree["ema_params"], rng=tree["rng"])


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0,
                       ema_decay: float = 0.0) -> TrainState:
  """Splits `model` and initialises the optimiser (and EMA copy when ema_decay > 0)."""
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Own buffers per leaf: a model may share one array between params (e.g. a freshly copied
  # branch), which buffer donation in a jitted step cannot handle.
  params = jax.tree.map(jnp.copy, params)
  ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                    ema_params=ema, rng=jax.random.PRNGKey(seed), graphdef=graphdef, tx=tx,
                    ema_decay=float(ema_decay))


def apply_gradients(state: TrainState, grads: Any) -> TrainState:
  """One optimiser update (and EMA update); returns the new state."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    d = state.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-position CE (..., V) x (...) -> (...), float32; torch CrossEntropyLoss(label_smoothing) semantics."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
  return nll


def split_rng(state: TrainState) -> tuple[TrainState, jax.Array]:
  rng, key = jax.random.split(state.rng)
  return state.replace(rng=rng), key


LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, trainable: Any | None = None) -> Callable[[TrainState, dict],
                                                                              tuple[TrainState, dict]]:
  """Builds the pure step from `loss_fn(model, batch, key) -> (loss, metrics)`.

  `trainable` (a bool tree like params, optional) restricts the reported grad norm to the
  params the optimiser updates (frozen ones get zero updates from the optimiser itself).
  """
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    state, key = split_rng(state)

    def objective(params):
      return loss_fn(state.model(params), batch, key)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    if trainable is not None:
      grads_for_norm = jax.tree.map(lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable)
    else:
      grads_for_norm = grads
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads_for_norm))
    return apply_gradients(state, grads), metrics

  return train_step
