"""Small training configs for the tests: the 16 px tiny tokenizer, a 2-block transformer, a tiny MAR and Hi-MAR."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import ml_collections

from hmar_jax.models.config import tiny_model_config
from hmar_jax.models.himar import himar_config as himar_model_config
from hmar_jax.models.mar import mar_config as mar_model_config
from hmar_jax.tokenizer.config import vqvae_config
from hmar_jax.tokenizer.kl_vae import kl_vae_config
from hmar_jax.training.schema import default_config
from hmar_jax.training.trainer import Trainer


def _quiet(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  c.train.num_steps = steps
  c.optim.warmup_steps = 0
  # The same learning rates whatever num_steps is: runs of different lengths compile the same step
  # (the persistent compilation cache then serves every test after the first).
  c.optim.schedule = "constant"
  c.log.every_steps = 1
  c.log.tensorboard = False
  c.checkpoint.every_steps = steps
  c.data.num_threads = 1
  return c


def nsp_config(kind: str = "hmar", *, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """Next-scale training of tiny_model_config(kind) over a random tiny tokenizer's tokens."""
  c = default_config("nsp")
  c.model = tiny_model_config(kind)
  c.model.attn_implementation = "xla"
  c.tokenizer.config = vqvae_config("tiny")
  c.loss.weighting = "lognorm" if kind == "hmar" else "uniform"
  c.data.num_examples = examples
  c.train.batch_size = batch
  c.optim.lr = 4e-2
  c.sample.grid_at_end = False
  return _quiet(c, steps)


def mask_config(init_from: str, *, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """Masked finetuning of the tiny HMAR from `init_from` (a next-scale run's params)."""
  base = nsp_config("hmar", steps=steps, batch=batch, examples=examples)
  c = default_config("mask_finetune")
  for section in ("model", "tokenizer", "data", "train", "optim", "log", "checkpoint", "sample"):
    c[section] = base[section]
  c.init_from = init_from
  return c


def tokenizer_config(*, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """The tiny 16 px VQVAE with EMA codebook and dead-code restarts (every branch of the step)."""
  c = default_config("tokenizer")
  c.model = vqvae_config("tiny")
  c.data.num_examples = examples
  c.data.num_eval_images = 4
  c.train.batch_size = batch
  c.optim.lr = 2e-3
  c.loss.l2_weight = 1.0
  c.codebook.dead_code_steps = 2
  return _quiet(c, steps)


def mar_config(*, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """MAR at 16 px over a random tiny KL VAE (16 px -> 4 x 4 tokens), 2 + 2 blocks of width 64."""
  c = default_config("mar")
  c.model = mar_model_config("tiny")
  c.model.img_size = 16
  c.model.vae_stride = 4
  c.model.buffer_size = 4
  c.model.num_sampling_steps = "4"
  c.tokenizer.config = kl_vae_config("tiny")
  c.tokenizer.config.image_size = 16
  c.tokenizer.config.resolution = 16
  c.tokenizer.config.enc_attn_resolutions = ()
  c.data.num_examples = examples
  c.train.batch_size = batch
  c.train.ema_decay = 0.9
  c.optim.lr = 4e-2
  c.sample.grid_at_end = False
  return _quiet(c, steps)


def himar_config(*, steps: int = 3, batch: int = 8, examples: int = 64) -> ml_collections.ConfigDict:
  """Hi-MAR at 16 px over a random tiny KL VAE: 4 x 4 high-resolution tokens, 2 x 2 pivots from 8 px."""
  m = mar_config(steps=steps, batch=batch, examples=examples)
  c = default_config("himar")
  for section in ("tokenizer", "data", "train", "optim", "log", "checkpoint"):
    c[section] = m[section]
  c.model = himar_model_config("tiny")
  for key in ("img_size", "vae_stride", "buffer_size", "num_sampling_steps"):
    c.model[key] = m.model[key]
  c.model.cond_scale = 2
  c.model.gdm_d, c.model.gdm_w, c.model.head = 1, 32, 2
  c.model.gdm_num_sampling_steps = "2"
  c.sample.grid_at_end = False
  return c


def read_jsonl(path) -> list[dict]:
  """The rows of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f]


class _HookedTrainer(Trainer):
  """A Trainer that calls `hook()` as it takes the `at`-th batch of a fit (see hooked_trainer)."""

  def __init__(self, config, workdir, *, at: int, hook, **kwargs):
    super().__init__(config, workdir, **kwargs)
    self._at, self._hook, self._taken = at, hook, 0

  def global_batch(self, host_batch):
    self._taken += 1
    if self._taken == self._at:
      self._hook()
    return super().global_batch(host_batch)


def hooked_trainer(config, workdir, *, at: int, hook, **kwargs) -> Trainer:
  """A Trainer that calls `hook()` as it takes the `at`-th batch of its fit (1-based, counted from
  the step it starts at), before that step runs: a signal sent there stops the run after that step
  (at start + at); an exception raised there ends it like a crash, with start + at - 1 steps done."""
  return _HookedTrainer(config, workdir, at=at, hook=hook, **kwargs)


class Interrupted(Exception):
  """Stands for a run being killed while it reads an image."""


class RecordingSource:
  """An image source that records the indices read, and stops the run (Interrupted) at index `stop_at`."""

  def __init__(self, source, stop_at=None):
    self._source, self._stop_at, self.read = source, stop_at, set()

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if i == self._stop_at:
      raise Interrupted(f"killed while reading image {i}")
    self.read.add(int(i))
    return self._source[i]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A localhost port free now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_worker_processes(worker: str, argv_per_process: list[list[str]], *, timeout: float) -> list[dict]:
  """Runs `python -c worker ARGV` once per entry of argv_per_process, side by side on CPU (no
  XLA_FLAGS inherited), and returns each process's last 'RESULT{json}' line, in process order.
  A process that fails fails the test with its stderr; none outlives the call."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", worker, *argv],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for argv in argv_per_process
  ]
  outs = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=timeout)
      assert proc.returncode == 0, stderr[-4000:]
      outs.append(json.loads([line for line in stdout.splitlines() if line.startswith("RESULT")][-1][6:]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return outs
