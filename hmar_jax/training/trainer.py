"""The shared trainer: one loop for every task, sharded over a (data, fsdp, tensor) mesh.

  trainer = Trainer(config, workdir)        # validates, joins the cluster, builds mesh and task
  result = trainer.fit()                    # resumes from WORKDIR/checkpoints, trains, finishes

The step is a pure function `train_step(state, batch) -> (state, metrics)`, jitted with explicit
input / output shardings and the state donated. Parameters and optimiser state are split by the
logical-axis rules (hmar_jax/parallel/partitioning.py); the batch over data x fsdp. Initial
parameters are created directly in their shards by a jitted init (no eager random init). Each
process reads the rows of every batch that its devices hold, read off the batch sharding (so
processes sharing a batch shard over a tensor axis read the same rows), and the global batch is
assembled from them (hmar_jax/data/loader.py); only process 0 writes logs, images and final weights.

Per step: split the PRNG key; prepare the batch on the device (the task); loss and gradients
(over `train.grad_accum_steps` micro-batches when > 1); global-norm clip + AdamW (optax); EMA; the
task's non-gradient updates. A step whose loss or gradient norm is not finite changes nothing and
marks the state halted: the loop then saves that last good state and stops, naming the step.

Checkpoints (hmar_jax/training/checkpointing.py) are written asynchronously every
`checkpoint.every_steps`, at the end, and when the run is asked to stop: Ctrl-C (SIGINT), SIGTERM
(with `checkpoint.on_preemption`) or a preemption notice. The step in flight finishes, its state is
saved, and `fit` returns with result['preempted'] and result['stopped_by'] ('SIGINT', 'SIGTERM' or
'preemption'); a second Ctrl-C aborts at once (KeyboardInterrupt), saving nothing more.

Resuming is exact: the state, the data position and the metrics of the unfinished log window are
restored from the newest checkpoint, so a run stopped and resumed logs the rows, and reaches the
parameters, of a run never stopped (metrics.jsonl keeps no row past the checkpoint's step).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from hmar_jax.compile_options import gpu_compiler_options
from hmar_jax.data.loader import make_train_loader
from hmar_jax.parallel import (
  batch_sharding,
  check_divisible,
  initialize_distributed,
  make_mesh,
  mesh_rules,
  process_batch_rows,
  replicated,
  tree_shardings,
)
from hmar_jax.parallel.partitioning import NamesLeaf
from hmar_jax.training import metrics as metrics_lib
from hmar_jax.training import schema
from hmar_jax.training.checkpointing import CheckpointManager, check_writable
from hmar_jax.training.optim import optimizer_from_config
from hmar_jax.training.task import Task, TrainState
from hmar_jax.training.tasks import TASKS

_LOAD = object()  # init_state's default: the task loads its pretrained variables itself


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN / inf; the last good state was saved."""


def make_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
  """The task named by config.task."""
  return TASKS[config.task](config, workdir)


def _names_like(tree: Any, names: Any) -> Any:
  """`names` if it matches `tree`'s structure, else unnamed leaves everywhere."""
  if names is not None:
    try:
      if jax.tree.structure(tree) == jax.tree.structure(names, is_leaf=lambda x: isinstance(x, NamesLeaf)):
        return names
    except (TypeError, ValueError):
      pass
  return jax.tree.map(lambda _: NamesLeaf(None), tree)


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B / k, ...): micro-batch j takes rows j, j + k, ..., so every device that holds
  a slice of the batch holds a slice of each micro-batch (no data moves)."""
  return x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)


def join_micro_batches(x: jax.Array) -> jax.Array:
  """Inverse of split_micro_batches: (k, B / k, ...) -> (B, ...) in the original order."""
  return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


class Trainer:
  """Mesh, sharded state, jitted step and the training loop of one task."""

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: str, *, task: Task | None = None, devices: list | None = None
  ):
    """devices: the devices to train on (default: all devices of all processes)."""
    schema.validate(config)  # before anything touches the devices
    initialize_distributed(config.distributed)
    devices = jax.devices() if devices is None else list(devices)
    schema.validate(config, num_devices=len(devices))
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.primary = jax.process_index() == 0
    self.mesh = make_mesh(config.mesh.shape, devices)
    self.rules = mesh_rules(config.mesh.rules)
    t = config.train
    what = (
      "train.batch_size"
      if t.grad_accum_steps == 1
      else f"the micro-batch (train.batch_size / train.grad_accum_steps = {t.batch_size} / {t.grad_accum_steps})"
    )
    check_divisible(
      t.batch_size // t.grad_accum_steps,
      config.model.num_heads if "num_heads" in config.model else None,
      dict(self.mesh.shape),
      what,
    )
    # The rows of every global batch this process's devices hold (all of them where a tensor axis
    # spans the processes); the loader reads exactly these and global_batch places them.
    self.batch_rows = process_batch_rows(batch_sharding(self.mesh), int(t.batch_size), jax.process_index())
    if not len(self.batch_rows):
      raise schema.ConfigError(
        f"process {jax.process_index()} holds no device of the mesh {dict(self.mesh.shape)}; every process "
        "of the run must contribute devices to it"
      )
    self._row_position = {int(r): k for k, r in enumerate(self.batch_rows)}
    if self.primary:
      check_writable(self.workdir, "workdir")  # read-only or full: refused before anything is built
    self.task = task if task is not None else make_task(config, self.workdir)
    self.tx, self.lr_fn = optimizer_from_config(config, stacked_groups=self.task.stacked_groups)
    self._jitted_step = None
    self._compiled_step: tuple[tuple, Any] | None = None  # (batch signature, executable) of compile_step
    self.step_changes: list[str] = []  # what compile_step changed to fit the step in memory
    # A device's memory for compile_step's fit check; None: the local allocator's limit (aot sets a
    # TPU chip's HBM, which abstract devices do not report).
    self.memory_limit_bytes: int | None = None
    self._shardings: TrainState | None = None
    self._abstract: TrainState | None = None

  # ---------------------------------------------------------------- contexts
  @contextlib.contextmanager
  def mesh_context(self):
    """The mesh and logical rules the model's sharding annotations and shard_map calls read."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  # ---------------------------------------------------------------- state
  def _keys(self) -> tuple[jax.Array, jax.Array]:
    init_key, train_key = jax.random.split(jax.random.key(int(self.config.seed)))
    return init_key, train_key

  def _init_state(self, init_key: jax.Array, train_key: jax.Array, pretrained: Mapping | None) -> TrainState:
    v = self.task.init_variables(init_key, pretrained)
    params = v["params"]
    ema = jax.tree.map(jnp.copy, params) if self.config.train.ema_decay > 0 else None
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=v.get("frozen", {}),
      model_vars=v.get("model_vars", {}),
      opt_state=self.tx.init(params),
      ema_params=ema,
      rng=jax.random.key_data(train_key),
      extra=v.get("extra", {}),
      halted_at=jnp.full((), -1, jnp.int32),
    )

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes (no memory, no compute; traced once)."""
    if self._abstract is None:
      init_key, train_key = self._keys()
      self._abstract = jax.eval_shape(self._init_state, init_key, train_key, None)
    return self._abstract

  def state_shardings(self, abstract: TrainState | None = None) -> TrainState:
    """NamedShardings of every state leaf: variables by their logical names, optimiser state and
    EMA like the parameters they follow, scalars replicated."""
    if self._shardings is not None and abstract is None:
      return self._shardings
    abstract = self.abstract_state() if abstract is None else abstract
    names = self.task.variable_names()
    rep = replicated(self.mesh)

    def shard(tree, key):
      if not jax.tree.leaves(tree):
        return jax.tree.map(lambda _: rep, tree)
      return tree_shardings(tree, self.mesh, self.rules, _names_like(tree, names.get(key)))

    params = shard(abstract.params, "params")
    opt = optax.tree_utils.tree_map_params(
      self.tx, lambda _, s: s, abstract.opt_state, params, transform_non_params=lambda _: rep
    )
    shardings = TrainState(
      step=rep,
      params=params,
      frozen=shard(abstract.frozen, "frozen"),
      model_vars=shard(abstract.model_vars, "model_vars"),
      opt_state=opt,
      ema_params=None if abstract.ema_params is None else params,
      rng=rep,
      extra=shard(abstract.extra, "extra"),
      halted_at=rep,
    )
    self._shardings = shardings
    return shardings

  def init_state(self, pretrained: Any = _LOAD) -> TrainState:
    """A fresh state, created directly in its shards (config.init_from etc. via the task).
    pretrained: what `task.load_pretrained()` gave, when the caller already called it."""
    init_key, train_key = self._keys()
    shardings = self.state_shardings()
    if pretrained is _LOAD:
      pretrained = self.task.load_pretrained()
    if pretrained is not None:
      rep = replicated(self.mesh)
      pretrained = jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), rep, lambda idx, x=x: np.asarray(x)[idx]), pretrained
      )
    with self.mesh_context():
      return jax.jit(self._init_state, out_shardings=shardings)(init_key, train_key, pretrained)

  # ---------------------------------------------------------------- step
  def _loss_and_grads(self, state: TrainState, batch: dict, key: jax.Array):
    task = self.task

    def loss_fn(params, micro, k):
      loss, metrics, aux = task.loss(params, state, micro, k)
      return loss, (metrics, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = int(self.config.train.grad_accum_steps)
    if k == 1:
      (loss, (metrics, aux)), grads = grad_fn(state.params, batch, key)
      return loss, metrics, aux, grads
    micro = jax.tree.map(lambda x: split_micro_batches(x, k), batch)
    keys = jax.random.split(key, k)

    def body(carry, xs):
      g_sum, l_sum, m_sum = carry
      (loss, (metrics, aux)), grads = grad_fn(state.params, xs[0], xs[1])
      carry = (jax.tree.map(jnp.add, g_sum, grads), l_sum + loss, jax.tree.map(jnp.add, m_sum, metrics))
      return carry, aux

    first = jax.tree.map(lambda x: x[0], micro)
    (_, (m_shape, _)), g_shape = jax.eval_shape(grad_fn, state.params, first, keys[0])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
    (grads, loss, metrics), auxs = jax.lax.scan(
      body, (zeros(g_shape), jnp.zeros((), jnp.float32), zeros(m_shape)), (micro, keys)
    )
    grads = jax.tree.map(lambda g: g / k, grads)
    metrics = jax.tree.map(lambda m: m / k, metrics)
    aux = {}
    for name, value in auxs.items():
      if name == "per_example":  # per-example outputs back in batch order
        aux[name] = jax.tree.map(join_micro_batches, value)
      else:  # e.g. model variables: those after the last micro-batch
        aux[name] = jax.tree.map(lambda x: x[-1], value)
    return loss / k, metrics, aux, grads

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
    """One optimiser step (pure; jit it, or call `compiled_step`). batch: host-layout arrays."""
    batch = dict(batch)
    skipped = batch.pop("skipped", None)
    key = jax.random.wrap_key_data(state.rng)
    rng, loss_key, after_key = jax.random.split(key, 3)
    batch = self.task.prepare_batch(batch, state.frozen)
    loss, metrics, aux, grads = self._loss_and_grads(state, batch, loss_key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      d = float(self.config.train.ema_decay)
      ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
    new = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema,
      rng=jax.random.key_data(rng),
      model_vars=aux.get("model_vars", state.model_vars),
    )
    new, more = self.task.after_update(new, aux, batch, after_key, self.tx)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.halted_at < 0)
    out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    out = out.replace(halted_at=jnp.where(ok | (state.halted_at >= 0), state.halted_at, state.step))
    metrics = dict(metrics, **more, loss=loss, grad_norm=grad_norm, lr=self.lr_fn(state.step).astype(jnp.float32))
    if skipped is not None:
      metrics["skipped_images"] = jnp.sum(skipped).astype(jnp.float32)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    metrics["halted_at"] = out.halted_at
    return out, metrics

  def batch_shardings(self, batch: Mapping[str, Any]) -> dict:
    return {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

  def compiled_step(self, batch: Mapping[str, Any]):
    """`train_step` jitted with explicit shardings and the state donated (cached); the executable
    of `compile_step` when it was compiled for batches like this one."""
    if self._compiled_step is not None and self._compiled_step[0] == _batch_signature(batch):
      return self._compiled_step[1]
    if self._jitted_step is None:
      shardings = self.state_shardings()
      level = int(self.config.train.gpu_autotune_level)
      self._jitted_step = jax.jit(
        self.train_step,
        in_shardings=(shardings, self.batch_shardings(batch)),
        out_shardings=(shardings, replicated(self.mesh)),
        donate_argnums=(0,),
        compiler_options=gpu_compiler_options(None if level < 0 else level),
      )
    return self._jitted_step

  def compile_step(self, batch: Mapping[str, Any]):
    """Compiles the step for batches like `batch` (global arrays, as from `global_batch`) from the
    state's shapes alone, without a state in memory; `compiled_step` then returns the executable.

    A step that would not fit in a device's memory (XLA's memory analysis against
    `memory_limit_bytes`, or a compiler that refuses it for lack of memory) is compiled again after
    `task.leaner_step()` while the task has a leaner configuration; each change is recorded in
    `step_changes`."""
    shardings = self.state_shardings()
    with self.mesh_context():
      state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state(), shardings
      )
      while True:
        try:
          executable, refused = self.compiled_step(batch).lower(state, batch).compile(), None
        except Exception as e:  # a compiler that plans memory itself (TPU) refuses what does not fit
          if not is_out_of_memory(e):
            raise
          executable, refused = None, e
        limit = self.memory_limit_bytes if self.memory_limit_bytes is not None else device_memory_limit()
        if executable is not None and step_fits(executable, limit):
          break
        change = self.task.leaner_step()
        if change is None:
          if refused is not None:
            raise refused
          break  # nothing leaner: run it as it is (the allocator has the last word)
        if self.primary:
          need = str(refused).splitlines()[0] if refused is not None else f"{step_bytes(executable) / 2**30:.1f} GiB"
          tqdm.write(f"the compiled step does not fit in a device's memory ({need}): recompiling with {change}")
        self.step_changes.append(change)
        self._jitted_step = None  # the task's model changed: trace again
    self._compiled_step = (_batch_signature(batch), executable)
    return executable

  def init_state_compiling_step(self, batch: Mapping[str, Any]) -> TrainState:
    """`init_state()` while `compile_step(batch)` runs on a second thread.

    XLA compiles without holding Python's lock, so the init program and the step compile side by
    side: a fresh run reaches its first step after the longer of the two, not after their sum.
    What can be refused (the shardings, a pretrained checkpoint) is checked before either starts."""
    self.state_shardings()  # computed once, here, rather than by both threads
    pretrained = self.task.load_pretrained()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_step") as pool:
      compiling = pool.submit(self.compile_step, batch)
      try:
        state = self.init_state(pretrained)
      except BaseException:
        concurrent.futures.wait([compiling])  # a compile cannot be interrupted; its result is moot
        raise
      compiling.result()  # the compile's own error, if any
    return state

  def global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict:
    """This process's rows of the batch -> global (train.batch_size, ...) arrays split over data x fsdp.

    host_batch: {field: (R, ...)}, row k being global row self.batch_rows[k] (what make_loader reads).
    Each local device gets its shard's rows; processes holding the same shard supply the same rows.
    """
    rows = len(self.batch_rows)
    for name, shape in self.task.example_shapes().items():
      got = tuple(np.shape(host_batch[name])) if name in host_batch else None
      if got is None or got[1:] != tuple(shape):
        want = "(B, " + ", ".join(map(str, shape)) + ")" if shape else "(B,)"
        raise ValueError(
          f"batch field {name!r} must be {want} for this {self.config.task} config, got "
          f"{'no such field' if got is None else got}"
        )
    for name, v in host_batch.items():
      if np.shape(v)[:1] != (rows,):
        raise ValueError(
          f"batch field {name!r} has shape {np.shape(v)}, but this process holds {rows} rows of the global "
          f"batch of {self.config.train.batch_size} on mesh {dict(self.mesh.shape)}"
        )
    position = self._row_position

    def make(v: np.ndarray) -> jax.Array:
      shape = (int(self.config.train.batch_size),) + v.shape[1:]

      def shard(index: tuple) -> np.ndarray:
        # A device's rows [start, stop) are all this process's, so they sit together in v.
        start, stop, _ = index[0].indices(shape[0])
        first = position[start]
        return v[(slice(first, first + stop - start),) + tuple(index[1:])]

      return jax.make_array_from_callback(shape, batch_sharding(self.mesh, v.ndim), shard)

    return {k: make(np.asarray(v)) for k, v in host_batch.items()}

  # ---------------------------------------------------------------- data
  def make_loader(self, start_step: int):
    d = self.config.data
    return make_train_loader(
      self.task.train_source(),
      global_batch=int(self.config.train.batch_size),
      seed=int(d.shuffle_seed),
      rows=self.batch_rows,
      start_step=start_step,
      num_threads=int(d.num_threads),
      prefetch=int(d.prefetch),
      worker_count=int(d.worker_count),
    )

  # ---------------------------------------------------------------- checkpoints
  def checkpoints(self) -> CheckpointManager:
    c = self.config.checkpoint
    return CheckpointManager(
      os.path.join(self.workdir, "checkpoints"), max_to_keep=int(c.max_to_keep), async_save=bool(c.async_save)
    )

  def _meta(self, loader_start: int, log_window: list[dict] | None = None) -> dict:
    """The checkpoint's JSON metadata. log_window: the host metrics of the steps since the last
    metrics row, so that a resumed run's next row averages the same steps as an unbroken run's."""
    return {
      "task": self.config.task,
      "config": self.config.to_json_best_effort(),
      "mesh": dict(self.mesh.shape),
      "process_count": jax.process_count(),
      "loader_start": loader_start,
      "log_window": log_window or [],
    }

  def restore_or_init(self, ckpt: CheckpointManager) -> tuple[TrainState, Any, int]:
    """(state, data iterator, its loader start) from the newest checkpoint, or fresh ones."""
    step = ckpt.latest_step()
    if step is None:
      loader = self.make_loader(0)
      return self.init_state(), iter(loader), 0
    meta = ckpt.restore_meta(step)
    abstract = self.abstract_state()
    ckpt.check_layout(step, abstract.as_dict())  # another model's run: named before the loader
    same_layout = int(meta.get("process_count", 1)) == jax.process_count()
    loader_start = int(meta.get("loader_start", 0)) if same_layout else step
    iterator = iter(self.make_loader(loader_start))
    shardings = self.state_shardings(abstract)
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract.as_dict(), shardings.as_dict()
    )
    tree, restored = ckpt.restore(step, target, iterator if same_layout else None)
    if not restored:  # a checkpoint without this process layout's iterator state: restart by step
      loader_start = step
      iterator = iter(self.make_loader(step))
    return TrainState.from_dict(tree), iterator, loader_start

  # ---------------------------------------------------------------- loop
  def fit(self) -> dict:
    """Trains to config.train.num_steps (resuming), then lets the task write its outputs."""
    with self.mesh_context():
      return self._fit()

  def _fit(self) -> dict:
    cfg = self.config
    num_steps, log_every = int(cfg.train.num_steps), int(cfg.log.every_steps)
    t_start = time.time()  # result['first_step_s'] counts from here: state, compile and the first step
    ckpt = self.checkpoints()
    latest = ckpt.latest_step()
    if latest is not None and latest > num_steps:  # before restoring anything
      ckpt.close()
      raise schema.ConfigError(
        f"the checkpoints in {ckpt.directory} are at step {latest}, past "
        f"config.train.num_steps = {num_steps}; raise num_steps or use a new workdir"
      )
    first_batch = None
    if latest is None:  # a fresh run: the step compiles from the first batch while the state is made
      data_iter, loader_start = iter(self.make_loader(0)), 0
      first_batch = self.global_batch(next(data_iter))
      state = self.init_state_compiling_step(first_batch)
    else:
      state, data_iter, loader_start = self.restore_or_init(ckpt)
    start = int(jax.device_get(state.step))
    self.task.begin(state, fresh=latest is None, gather=self._gather_for_finish)
    # (step, metrics) of the steps since the last metrics row; on resume, those saved with the state.
    window = [(s, m) for s, m in _window_from_meta(ckpt.restore_meta(start)) if s <= start] if start else []
    writer = metrics_lib.MetricsWriter(
      self.workdir, enabled=self.primary, tensorboard=bool(cfg.log.tensorboard), start_step=start
    )
    batch_size = int(cfg.train.batch_size)
    step_flops = self.task.step_flops(batch_size)
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    tokens = getattr(self.task, "tokens_per_example", lambda: None)()
    stop = _stop_signals(jax.process_count(), on_preemption=bool(cfg.checkpoint.on_preemption))
    history: list[dict] = []
    result: dict[str, Any] = {"preempted": False, "stopped_by": None, "checkpoint_dir": ckpt.directory}
    last_saved = start
    skipped_total = 0.0
    bar = tqdm(
      total=num_steps, initial=start, desc=f"{cfg.task}", unit="step", dynamic_ncols=True, disable=not self.primary
    )
    try:
      with stop:
        t_window, timed, prev_metrics, compile_s = None, 0, None, None
        step = start
        while step < num_steps:
          batch = self.global_batch(next(data_iter)) if first_batch is None else first_batch
          first_batch = None
          if self._compiled_step is None:  # a resumed run: compiled (and fitted to memory) first
            self.compile_step(batch)
          step_fn = self.compiled_step(batch)
          state, metrics = step_fn(state, batch)
          window.append((step + 1, metrics))
          if compile_s is None:  # the first step compiles: keep it out of the throughput
            jax.block_until_ready(metrics)
            compile_s = time.time() - t_start
            result["first_step_s"] = round(compile_s, 3)
            if self.step_changes:
              result["step_changes"] = list(self.step_changes)
            t_window, timed = time.time(), 0
          else:
            timed += 1
          step += 1
          bar.update(1)
          # One step behind: read the previous step's halt flag while this one runs.
          if prev_metrics is not None and int(prev_metrics["halted_at"]) >= 0:
            break
          prev_metrics = metrics
          if step % log_every == 0 or step == num_steps:
            row = self._log_row([m for _, m in window], timed, t_window, batch_size, step_flops, peak, tokens)
            if int(row.pop("halted_at")) >= 0:
              break
            writer.write(step, row)
            history.append({"step": step, **row})
            postfix = {
              k: f"{row[k]:.4g}"
              for k in ("loss", *self.task.progress_fields(), "img_s", "mfu")
              if isinstance(row.get(k), float)
            }
            skipped_total += row.get("skipped_images", 0.0)
            if skipped_total:  # unreadable images replaced so far in this session
              postfix["skipped"] = f"{skipped_total:.0f}"
            bar.set_postfix(postfix, refresh=False)
            window, t_window, timed = [], time.time(), 0
          if jax.process_count() == 1:
            stopped_by = stop.received
          else:
            stopped_by = (stop.received or "preemption") if ckpt.reached_preemption(step) else None
          if step % int(cfg.checkpoint.every_steps) == 0 or step == num_steps or stopped_by:
            ckpt.save(step, state.as_dict(), data_iter, self._meta(loader_start, _window_to_meta(window)))
            last_saved = step
          if stopped_by:
            result.update(preempted=True, stopped_by=stopped_by)
            break
        bar.close()
        halted = int(jax.device_get(state.halted_at))
        if halted >= 0:
          good = int(jax.device_get(state.step))
          if good != last_saved and good not in ckpt.all_steps():
            # Saved un-halted, so a rerun (with, say, a lower learning rate) trains on from here.
            good_state = state.replace(halted_at=jax.device_put(np.int32(-1), replicated(self.mesh)))
            good_window = _window_to_meta([(s, m) for s, m in window if s <= good])
            ckpt.save(good, good_state.as_dict(), data_iter, self._meta(loader_start, good_window))
          ckpt.close()
          writer.close()
          raise NonFiniteLossError(
            f"the loss or gradient norm was not finite at step {halted + 1}; training stopped and the last "
            f"good state (after step {good}) is saved in {ckpt.directory}"
          )
    except NonFiniteLossError:
      raise
    except BaseException as e:
      # A crash or a second Ctrl-C: the metrics logged so far reach the disk, and a checkpoint being
      # written is finished, unless the user asked to stop at once.
      bar.close()
      writer.close()
      if not isinstance(e, KeyboardInterrupt):
        ckpt.close()
      raise
    ckpt.close()
    writer.close()
    result.update(step=int(jax.device_get(state.step)), history=history, checkpoint_step=last_saved)
    if result["preempted"]:
      return result
    host = self._gather_for_finish(state)
    result.update(self.task.finish(state, host, primary=self.primary))
    return result

  def _log_row(self, window, timed, t_window, batch_size, step_flops, peak, tokens) -> dict:
    """Window means of the metrics, plus throughput over the `timed` steps since t_window."""
    stacked = jax.device_get(window)
    halted = max(int(m["halted_at"]) for m in stacked)
    mean = {
      k: np.mean(np.stack([np.asarray(m[k], np.float64) for m in stacked]), axis=0)
      for k in stacked[0]
      if k != "halted_at"
    }
    row = metrics_lib.to_host_scalars(mean)
    row["lr"] = float(stacked[-1]["lr"])  # the schedule's value now, not its window mean
    if "skipped_images" in row:
      row["skipped_images"] = float(sum(float(m["skipped_images"]) for m in stacked))
    if not timed:  # only the compiling step so far
      row["halted_at"] = halted
      return row
    jax.block_until_ready(window[-1])
    seconds = max(time.time() - t_window, 1e-9)
    steps = timed
    row["img_s"] = steps * batch_size / seconds
    if tokens:
      row["tokens_s"] = row["img_s"] * tokens
    if step_flops:
      row["tflops_per_device"] = step_flops * steps / seconds / self.mesh.size / 1e12
      if peak:
        row["mfu"] = row["tflops_per_device"] * 1e12 / peak
    row["halted_at"] = halted
    return row

  def _gather_for_finish(self, state: TrainState) -> dict:
    """params / ema / frozen / model_vars as numpy on every process (collective)."""
    tree = {
      "params": state.params,
      "frozen": state.frozen,
      "model_vars": state.model_vars,
      "extra": state.extra,
      "step": state.step,
    }
    if state.ema_params is not None:
      tree["ema_params"] = state.ema_params
    if jax.process_count() == 1:
      return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


# Of the device allocator's limit, what a compiled step may plan to use (arguments, outputs and
# XLA's temporaries): the rest is left to fragmentation and to what runs beside the step.
STEP_MEMORY_FRACTION = 0.9


def step_bytes(executable) -> int | None:
  """Device bytes a compiled (per-device) program uses, from XLA's memory analysis; None where the
  backend gives none."""
  try:
    m = executable.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
    + m.generated_code_size_in_bytes
  )


def device_memory_limit() -> int | None:
  """The allocator's limit on one local device in bytes; None where the backend reports none (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def step_fits(executable, limit: int | None) -> bool:
  """Whether the compiled step fits in STEP_MEMORY_FRACTION of `limit` bytes (True when either
  figure is unknown)."""
  need = step_bytes(executable)
  return need is None or limit is None or need <= STEP_MEMORY_FRACTION * limit


def is_out_of_memory(error: BaseException) -> bool:
  """A compile refused for lack of device memory (XLA's RESOURCE_EXHAUSTED status)."""
  return "RESOURCE_EXHAUSTED" in str(error)


def _batch_signature(batch: Mapping[str, Any]) -> tuple:
  """What a compiled step fixes about its batch: each field's shape, dtype and sharding."""
  return tuple(
    (k, tuple(np.shape(v)), str(np.dtype(v.dtype)), getattr(v, "sharding", None)) for k, v in sorted(batch.items())
  )


def _window_to_meta(window: list[tuple[int, Any]]) -> list[dict]:
  """(step, device metrics) pairs -> JSON rows {'step', 'metrics': {name: float or [floats]}}.

  Python floats round-trip through JSON exactly, so restored float32 values are the same bits."""
  rows = []
  for step, metrics in jax.device_get(window):
    values = {k: np.asarray(v).tolist() for k, v in metrics.items()}
    rows.append({"step": int(step), "metrics": values})
  return rows


def _window_from_meta(meta: Mapping) -> list[tuple[int, dict]]:
  """Inverse of _window_to_meta (float32 metrics, int32 halted_at); [] for older checkpoints."""
  out = []
  for row in meta.get("log_window", []):
    metrics = {k: np.asarray(v, np.int32 if k == "halted_at" else np.float32) for k, v in row["metrics"].items()}
    out.append((int(row["step"]), metrics))
  return out


def _stop_signals(process_count: int, *, on_preemption: bool) -> _StopSignals:
  """The signal handling of a run of `process_count` processes.

  One process: Python handlers for Ctrl-C and (with checkpoint.on_preemption) SIGTERM. Several:
  JAX's preemption notifier, installed by jax.distributed, owns SIGTERM and makes every process
  stop at the same step; a Python handler would replace it (and SIGTERM would be swallowed), so only
  Ctrl-C gets one, which passes it on to the notifier as SIGTERM.
  """
  if process_count == 1:
    return _StopSignals((signal.SIGINT, signal.SIGTERM) if on_preemption else (signal.SIGINT,))
  return _StopSignals((), forward_sigint=bool(jax.config.jax_enable_preemption_service))


class _StopSignals:
  """Context manager: the first of `signums` (SIGINT, SIGTERM) asks the run to stop after the step
  in flight (`received` names it) instead of killing it; a second SIGINT raises KeyboardInterrupt
  at once (a user who means it). forward_sigint: also take SIGINT, and pass the first on as SIGTERM
  to this process (multi-process runs, where JAX's preemption notifier handles SIGTERM and the
  processes agree on the step to save). The previous handlers come back on exit. Outside the main
  thread (where no handler can be set) it does nothing."""

  def __init__(self, signums: tuple[int, ...], *, forward_sigint: bool = False):
    self.signums = tuple(signums) + ((signal.SIGINT,) if forward_sigint and signal.SIGINT not in signums else ())
    self.forward_sigint = forward_sigint
    self.received: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.received is None:
      self.received = signal.Signals(signum).name
      if self.forward_sigint and signum == signal.SIGINT:
        os.kill(os.getpid(), signal.SIGTERM)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.signums:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    return False


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Builds the trainer for config.task and runs it (the entry point of `python -m hmar_jax.train`)."""
  return Trainer(config, workdir).fit()
