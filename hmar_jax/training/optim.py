"""Optimiser and learning-rate schedule of the official VAR/HMAR recipe, in optax.

- AdamW with betas (0.9, 0.95), eps 1e-8 (torch default), decoupled weight decay 0.05
  (official args: tblr 1e-4, twd 0.05, tclip 2.0, opt 'adamw' with betas (0.9, 0.95)).
- Peak lr = base_lr * global_batch / 256 (official arg_util: tlr = ac * tblr * bs / 256).
- No weight decay on 1-D params, biases, and names containing one of `NO_DECAY_KEYS`
  (official train.py filter_params nowd_keys: position / level embeddings, start token,
  the attention log-scale 'scale_mul', ...). Note: like the official code, the class
  embedding and the mask embedding *are* decayed (2-D, not in the key list); add
  'class_emb' / 'mask_embed' to `no_decay_keys` to change that.
- Gradients clipped to global norm 2.0, the norm taken over trainable params only
  (official AmpOptimizer clips the params that require grad).
- Frozen params (finetuning) get zero updates through optax.multi_transform with
  optax.set_to_zero, and no optimiser state.
- Schedule (official lr_control.lr_wd_annealing): linear warmup from wp0 * peak to peak
  over `warmup_steps`, then, for 'lin0' (the official default), hold the peak for 5% of
  the remaining steps and decay linearly to wpe * peak at the last step; 'lin00' decays
  linearly with no hold; 'cos' is a half cosine to wpe * peak; 'constant' holds the peak.
  Weight decay follows a half cosine from wd to wd_end over the whole run (constant when
  wd_end == wd, the official default twde = twd).

`optimizer_from_config(config)` builds all of this from a training config's `optim` and
`train` sections (hmar_jax/training/schema.py holds the defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hmar_jax.training.schema import NO_DECAY_KEYS

TRAIN, FROZEN = "train", "frozen"


def path_name(path: Sequence[Any]) -> str:
  """'a/b/0/kernel' for a jax key path (NNX's trailing '.value' is dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_names(params: Any) -> Any:
  """Same tree as `params` with each leaf replaced by its '/'-joined name."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), params)


def decays(name: str, ndim: int, no_decay_keys: Sequence[str] = NO_DECAY_KEYS) -> bool:
  """Whether a parameter gets weight decay (official filter_params rule); ndim without a scan axis."""
  leaf = name.rsplit("/", 1)[-1]
  if ndim <= 1 or leaf.endswith("bias") or name.endswith("bias"):
    return False
  return not any(k in name for k in no_decay_keys)


def weight_decay_mask(
  params: Any, no_decay_keys: Sequence[str] = NO_DECAY_KEYS, stacked_groups: Sequence[str] = ()
) -> Any:
  """Tree of bools: True where weight decay applies.

  stacked_groups: top-level names whose leaves carry a leading scan ('layers') axis, which does
  not count towards the official 1-D rule.
  """

  def one(p, x):
    name = path_name(p)
    stacked = name.split("/", 1)[0] in stacked_groups
    return decays(name, jnp.ndim(x) - int(stacked), no_decay_keys)

  return jax.tree_util.tree_map_with_path(one, params)


def peak_learning_rate(base_lr: float, global_batch_size: int) -> float:
  """Official linear scaling rule: lr = base_lr * batch / 256."""
  return base_lr * global_batch_size / 256.0


def lr_schedule(
  peak_lr: float, total_steps: int, warmup_steps: int, *, kind: str = "lin0", wp0: float = 0.005, wpe: float = 0.01
) -> Callable[[jax.Array], jax.Array]:
  """Learning rate at optimiser step `count` (0-based), as official lr_wd_annealing."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if warmup_steps < 0 or (warmup_steps > 0 and warmup_steps >= total_steps):
    raise ValueError(f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
  hold = {"lin0": 0.05, "lin": 0.15, "lin00": 0.0, "cos": 0.0, "constant": 1.0}
  if kind not in hold:
    raise ValueError(f"unknown lr schedule {kind!r}; expected one of {tuple(hold)}")
  warmup_steps = int(round(warmup_steps))
  decay_len = max(total_steps - 1 - warmup_steps, 1)

  def schedule(count):
    it = jnp.asarray(count, jnp.float32)
    warm = wp0 + (1 - wp0) * it / max(warmup_steps, 1)
    passed = jnp.clip((it - warmup_steps) / decay_len, 0.0, 1.0)
    if kind == "constant":
      after = jnp.ones_like(passed)
    elif kind == "cos":
      after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(jnp.pi * passed))
    else:
      t = hold[kind]
      after = jnp.where(passed < t, 1.0, wpe + (1 - wpe) * (1 - passed) / (1 - t))
    return peak_lr * jnp.where(it < warmup_steps, warm, after)

  return schedule


def wd_schedule(wd: float, wd_end: float, total_steps: int) -> Callable[[jax.Array], jax.Array] | float:
  """Half cosine from wd to wd_end (official); a constant when they are equal."""
  if wd_end == wd:
    return wd

  def schedule(count):
    passed = jnp.asarray(count, jnp.float32) / max(total_steps - 1, 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(jnp.pi * passed))

  return schedule


def make_optimizer(
  *,
  learning_rate: float | Callable,
  weight_decay: float | Callable = 0.05,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  grad_clip: float = 2.0,
  no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
  trainable: Callable[[str], bool] | None = None,
  stacked_groups: Sequence[str] = (),
) -> optax.GradientTransformation:
  """The official AdamW recipe; `trainable(name) -> bool` freezes everything it rejects.

  The returned transformation works on any tree of params whose key paths carry the
  parameter names (an nnx.State, or a nested dict).
  """

  def wd_mask(params):
    return weight_decay_mask(params, no_decay_keys, stacked_groups)

  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=wd_mask))
  tx = optax.chain(*parts)
  if trainable is None:
    return tx

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: TRAIN if trainable(path_name(p)) else FROZEN, params)

  return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)


def trainable_mask(params: Any, trainable: Callable[[str], bool] | None) -> Any:
  """Tree of bools: True for params the optimiser updates."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: True if trainable is None else bool(trainable(path_name(p))), params
  )


def global_norm_of(tree: Any, mask: Any | None = None) -> jax.Array:
  """L2 norm over the leaves of `tree` (only where `mask` is True, if given)."""
  if mask is not None:
    tree = jax.tree.map(lambda x, m: x if m else jnp.zeros((), x.dtype), tree, mask)
  return optax.tree.norm(tree)


def optimizer_from_config(
  config, *, stacked_groups: Sequence[str] = ()
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """(AdamW transformation, learning-rate schedule) of a training config's optim / train sections."""
  o, t = config.optim, config.train
  total = int(t.num_steps)
  peak = peak_learning_rate(float(o.lr), int(t.batch_size)) if o.scale_lr_by_batch else float(o.lr)
  warmup = int(o.warmup_steps)
  if warmup < 0:  # official default: wp = ep / 50, i.e. 2% of training
    warmup = int(round(total * float(o.warmup_frac)))
  if warmup >= total:
    warmup = 0
  sched = lr_schedule(peak, total, warmup, kind=o.schedule, wp0=float(o.wp0), wpe=float(o.wpe))
  wd = float(o.weight_decay)
  wd_end = wd if o.weight_decay_end < 0 else float(o.weight_decay_end)
  tx = make_optimizer(
    learning_rate=sched,
    weight_decay=wd_schedule(wd, wd_end, total),
    b1=float(o.b1),
    b2=float(o.b2),
    eps=float(o.eps),
    grad_clip=float(o.grad_clip),
    no_decay_keys=tuple(o.no_decay_keys),
    stacked_groups=stacked_groups,
  )
  return tx, sched
