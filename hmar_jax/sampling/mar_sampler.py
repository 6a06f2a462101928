"""MAR's masked generation loop (official models/mar.py `sample_tokens`) for any per-token sampler.

The loop (MaskGIT / MAGE style, random order per image): all L tokens start masked; at step
s = 0 .. num_iter - 1 the backbone encodes the visible tokens, the next step keeps
mask_len_s = max(1, min(masked - 1, floor(L * cos(pi / 2 * (s + 1) / num_iter)))) tokens masked
(the first ones of each image's order), and the tokens leaving the mask are sampled by the head
from their z; the last step samples all remaining ones. With classifier-free guidance (cfg != 1)
the backbone runs on 2B rows, the second half with the fake latent as class embedding, and the
head gets z of both halves (conditional rows first) and the guidance scale of the step:
'linear' 1 + (cfg - 1) * (L - mask_len_s) / L (Muse), or 'constant' cfg.

Static shapes: the number of tokens leaving the mask at each step is the same for every image and
depends only on (num_iter, L), so `mar_schedule` computes it on the host; each step gathers only
the z of its predicted tokens, padded up to a power of two (`bucket`; the padding rows are thrown
away), and encodes with a capacity of the visible tokens also rounded up to a power of two, so a
whole generation compiles a handful of shapes.

Editing (known / keep): tokens with keep = True are given by the caller, visible to the encoder
from the first step and never replaced. They take the last places of each image's order, i.e. the
places the schedule fills first, so the free tokens are still sampled exactly once each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.models.mar import sample_orders

CFG_SCHEDULES = ("linear", "constant")


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of the host schedule.

  masked_before: tokens still masked when the step starts (the backbone's mask).
  mask_len: the official mask_len of the step (tokens left masked for the next one; the linear
    CFG schedule uses it, also at the last step).
  start, stop: the step predicts the tokens at places [start, stop) of each image's order
    (start = mask_len, or 0 at the last step; stop = masked_before).
  """

  index: int
  masked_before: int
  mask_len: int
  start: int
  stop: int

  @property
  def num_pred(self) -> int:
    return self.stop - self.start


def bucket(n: int, limit: int) -> int:
  """The smallest power of two >= n, at most `limit` (0 for 0)."""
  if n <= 0:
    return 0
  return min(1 << (n - 1).bit_length(), limit)


def mar_schedule(num_iter: int, seq_len: int) -> list[Step]:
  """The official loop's masking schedule, on the host (float64 cosine as numpy computes it)."""
  if num_iter < 1:
    raise ValueError(f"num_iter must be >= 1, got {num_iter}")
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  steps, masked = [], seq_len
  for s in range(num_iter):
    ratio = np.cos(math.pi / 2.0 * (s + 1) / num_iter)
    mask_len = max(1, min(masked - 1, int(np.floor(seq_len * ratio))))
    start = 0 if s == num_iter - 1 else mask_len
    steps.append(Step(index=s, masked_before=masked, mask_len=mask_len, start=start, stop=masked))
    masked = start
  return steps


def cfg_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
  """The guidance scale of a step: 'linear' 1 + (cfg - 1) * (L - mask_len) / L, or 'constant' cfg."""
  if schedule == "linear":
    return 1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len
  if schedule == "constant":
    return float(cfg)
  raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


def _ranks(orders: jax.Array) -> jax.Array:
  b, n = orders.shape
  return jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], orders].set(jnp.arange(n, dtype=jnp.int32))


def sample_tokens(
  backbone_fn: Callable,
  head_sample_fn: Callable,
  labels: jax.Array | None,
  key: jax.Array,
  *,
  num_iter: int,
  cfg: float,
  cfg_schedule: str,
  temperature: float,
  seq_len: int,
  token_dim: int,
  batch: int | None = None,
  known: jax.Array | None = None,
  keep: jax.Array | None = None,
  orders: jax.Array | None = None,
) -> jax.Array:
  """Generates tokens (B, seq_len, token_dim) float32 with the official MAR loop.

  Args:
    backbone_fn: fn(tokens (N, L, C), mask (N, L) bool (True = masked), labels (N,) int32,
      drop_labels (N,) bool (True: fake latent instead of the label's embedding), num_visible: int
      (static bound on the visible tokens of any row)) -> z (N, L, Cz); `backbone_sample_fn` makes
      one from a MARBackbone. Jit it (its shapes per step are static and bucketed).
    head_sample_fn: fn(z (M, Cz), key, temperature: float, cfg: float) -> (M, token_dim); with
      cfg != 1 (CFG on), the rows are [conditional; unconditional] halves and the first half of the
      output is used, as the official DiffLoss.sample.
    labels: (B,) int class labels, or None (unconditional: the fake latent on every row).
    key: PRNG key (orders and the head's sampling).
    num_iter, cfg, cfg_schedule ('linear' | 'constant'), temperature: the official arguments.
    seq_len, token_dim: L and C of the tokens.
    batch: B when labels is None (else taken from labels).
    known: (B, L, C) tokens given by the caller, used where keep is True.
    keep: (B, L) bool, True where `known` is kept (never predicted, visible from the first step).
    orders: (B, L) int permutations to use instead of random ones (tests; with keep, the kept
      places must be the last ones of each order).
  """
  if cfg_schedule not in CFG_SCHEDULES:
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
  if labels is None and batch is None and known is None:
    raise ValueError("give labels, batch or known: the batch size is unknown")
  b = int(labels.shape[0]) if labels is not None else (int(batch) if batch is not None else int(known.shape[0]))
  if (known is None) != (keep is None):
    raise ValueError("known and keep go together: give both or neither")
  if known is not None and (tuple(known.shape) != (b, seq_len, token_dim) or tuple(keep.shape) != (b, seq_len)):
    raise ValueError(
      f"known must be (B, L, C) = {(b, seq_len, token_dim)} and keep (B, L) = {(b, seq_len)}, "
      f"got {tuple(known.shape)} and {tuple(keep.shape)}"
    )
  steps = mar_schedule(num_iter, seq_len)
  k_orders, k_head = jax.random.split(key)
  if known is not None:
    keep = jnp.asarray(keep, bool)
    tokens = jnp.where(keep[:, :, None], jnp.asarray(known, jnp.float32), 0.0)
    if orders is None:  # kept tokens last in the order: the places the schedule fills first
      noise = jax.random.uniform(k_orders, (b, seq_len))
      orders = jnp.argsort(noise + 2.0 * keep, axis=-1).astype(jnp.int32)
    # A row shows max(L - masked_before, its kept count) tokens; bound it on the host when possible.
    most_kept = seq_len if isinstance(keep, jax.core.Tracer) else int(jnp.max(jnp.sum(keep, axis=1)))
  else:
    tokens = jnp.zeros((b, seq_len, token_dim), jnp.float32)
    orders = sample_orders(k_orders, b, seq_len) if orders is None else orders
    most_kept = 0
  orders = jnp.asarray(orders, jnp.int32)
  ranks = _ranks(orders)
  guided = cfg != 1.0
  drop = jnp.full((b,), labels is None, bool)  # unconditional: the fake latent on every row
  labels = jnp.zeros((b,), jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
  if guided:
    labels2, drop2 = jnp.concatenate([labels, labels]), jnp.concatenate([drop, jnp.ones((b,), bool)])
  else:
    labels2, drop2 = labels, drop

  for step in steps:
    n = step.num_pred
    if n == 0:  # only when num_iter > L: the official step samples an empty set, changing nothing
      continue
    mask = ranks < step.masked_before
    if keep is not None:
      mask = mask & ~keep
    visible = bucket(max(seq_len - step.masked_before, most_kept), seq_len)
    x, m = (jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask])) if guided else (tokens, mask)
    z = backbone_fn(x, m, labels2, drop2, visible)
    rows = bucket(n, seq_len)
    idx = orders[:, step.start : step.stop]
    idx_padded = jnp.pad(idx, ((0, 0), (0, rows - n)))  # padding rows gather place 0, then are dropped
    if guided:
      idx_padded = jnp.concatenate([idx_padded, idx_padded])
    z_pred = jnp.take_along_axis(z, idx_padded[:, :, None], axis=1).reshape(-1, z.shape[-1])
    scale = cfg_scale(cfg, cfg_schedule, step.mask_len, seq_len)
    sampled = head_sample_fn(z_pred, jax.random.fold_in(k_head, step.index), temperature, scale)
    sampled = jnp.asarray(sampled, jnp.float32)[: b * rows].reshape(b, rows, token_dim)[:, :n]
    tokens = _write(tokens, idx, sampled, keep)
  return tokens


@jax.jit
def _write(tokens: jax.Array, idx: jax.Array, sampled: jax.Array, keep: jax.Array | None) -> jax.Array:
  """tokens (B, L, C) with sampled (B, n, C) written at places idx (B, n), except kept places."""
  rows = jnp.arange(tokens.shape[0])[:, None]
  if keep is not None:
    sampled = jnp.where(keep[rows, idx][:, :, None], tokens[rows, idx], sampled)
  return tokens.at[rows, idx].set(sampled)


def backbone_sample_fn(backbone) -> Callable:
  """A jitted `backbone_fn` for `sample_tokens` from a MARBackbone (evaluation mode; capacity =
  buffer_size + num_visible)."""
  graphdef, state = nnx.split(backbone)
  buf = backbone.buffer_size

  @functools.partial(jax.jit, static_argnums=(5,))
  def run(state, tokens, mask, labels, drop, num_visible):
    model = nnx.merge(graphdef, state)
    return model(tokens, mask, labels, key=None, capacity=buf + num_visible, drop_labels=drop)

  return lambda tokens, mask, labels, drop, num_visible: run(state, tokens, mask, labels, drop, num_visible)
