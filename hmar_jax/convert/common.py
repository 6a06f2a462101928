"""Shared machinery for converting official PyTorch state_dicts into NNX states.

A converter builds a *plan*: one `Entry` per source tensor, naming the official key, the NNX
state path it fills, the expected source shape and how to transform it (e.g. transpose a
conv kernel). `apply_plan` then

  * pops every planned key from the state_dict exactly once,
  * reports every missing key, unexpected (unplanned) key, mis-shaped key and tensor with unusable
    values (an integer tensor where float weights go, NaN / Inf) by name, all at once, as a
    `ConversionError`,
  * checks that the plan fills every leaf of the target state (except leaves explicitly left at
    their defaults), so nothing in the model stays randomly initialised by accident,

and returns an `nnx.State` with the converted arrays. PyTorch is imported only in
`load_torch_checkpoint`, so the rest works (and is testable) without it.

Layout conversions (PyTorch -> NNX):
  Conv2d weight (O, I, kh, kw) -> kernel (kh, kw, I, O)      `conv_kernel`
  Linear weight (O, I)         -> kernel (I, O)              `linear_kernel`
  Embedding weight (V, C)      -> embedding (V, C)           `identity`
  GroupNorm/LayerNorm weight   -> scale                      `identity`
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple  # an NNX state path, e.g. ('encoder', 'down', 0, 'block', 1, 'conv1', 'kernel')


class ConversionError(ValueError):
  """A source checkpoint does not match what the converter expects (names the keys)."""


# ----------------------------------------------------------------------------- transforms


def identity(x: np.ndarray) -> np.ndarray:
  return x


def conv_kernel(x: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight (O, I, kh, kw) -> NNX Conv kernel (kh, kw, I, O)."""
  return np.transpose(x, (2, 3, 1, 0))


def linear_kernel(x: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (O, I) -> NNX Linear kernel (I, O)."""
  return np.transpose(x, (1, 0))


def conv_source_shape(kernel_shape: Sequence[int]) -> tuple[int, ...]:
  kh, kw, i, o = kernel_shape
  return (o, i, kh, kw)


def linear_source_shape(kernel_shape: Sequence[int]) -> tuple[int, ...]:
  i, o = kernel_shape
  return (o, i)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source tensor -> one target leaf."""

  source_key: str
  target_path: Path
  source_shape: tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray] = identity


def path_str(path: Iterable) -> str:
  return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------- loading


def load_torch_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint") -> dict[str, np.ndarray]:
  """Loads a PyTorch .pth state_dict as {key: float32/int NumPy array}.

  Uses torch.load(weights_only=True) (no arbitrary code execution). Accepts a plain
  state_dict or one nested under a single wrapper key ('state_dict', 'model', 'module').
  Raises ConversionError with the file name for missing files, non-checkpoint files and
  checkpoints that hold no tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"{what} file {path!r} does not exist")
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is an optional extra
    raise ImportError("converting PyTorch checkpoints needs torch: pip install 'hmar_jax[torch]'") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - the unpickler raises anything on garbage (IndexError, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(
      f"{path!r} is not a PyTorch checkpoint that torch.load(weights_only=True) can "
      f"read ({type(e).__name__}: {first[:200]})"
    ) from e
  for wrapper in ("state_dict", "model", "module"):
    if isinstance(obj, Mapping) and set(obj.keys()) == {wrapper} and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path!r} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
  out, skipped = {}, []
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      t = v.detach().cpu()
      if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
      out[str(k)] = t.numpy()
    else:
      skipped.append(str(k))
  if not out:
    raise ConversionError(
      f"{path!r} contains no tensors (keys: {sorted(map(str, obj.keys()))[:10]}); is it a state_dict?"
    )
  if skipped:
    raise ConversionError(f"{path!r} has non-tensor entries {skipped[:10]}; expected a flat state_dict")
  return out


# ----------------------------------------------------------------------------- plan application


def flat_leaves(state: nnx.State) -> dict[Path, Any]:
  """{path: leaf value} of an NNX state (values may be arrays or ShapeDtypeStructs)."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    out[tuple(path)] = var.get_value() if hasattr(var, "get_value") else var.value
  return out


def value_problem(x: np.ndarray, target_dtype: Any) -> str | None:
  """What makes source tensor `x` unusable for a variable of `target_dtype`, or None.

  Float variables need floating-point tensors (an integer or bool tensor there means a wrong or
  damaged file, and casting it would silently give weights like 0, 1, 2) holding no NaN / Inf (a
  diverged or damaged checkpoint would convert fine and then sample noise).
  """
  if not jnp.issubdtype(target_dtype, jnp.inexact):
    return None
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return f"has dtype {x.dtype}, expected floating-point weights"
  bad = int(x.size - np.count_nonzero(np.isfinite(x)))
  if bad:
    nan = int(np.count_nonzero(np.isnan(x)))
    return f"holds {bad} non-finite value(s) of {x.size} ({nan} NaN, {bad - nan} Inf)"
  return None


def _describe(problems: list[str], limit: int = 40) -> str:
  shown = problems[:limit]
  more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
  return "\n  " + "\n  ".join(shown) + more


def apply_plan(
  state_dict: Mapping[str, np.ndarray],
  plan: Sequence[Entry],
  target: nnx.State,
  *,
  source_name: str = "state_dict",
  defaults: Mapping[Path, Any] | None = None,
  hint: Callable[[list[str], list[str], list[str]], str] | None = None,
) -> nnx.State:
  """Converts `state_dict` into a copy of `target` (abstract or concrete) following `plan`.

  Args:
    state_dict: {official key: array}; not modified.
    plan: one Entry per expected source key.
    target: the NNX state to fill (e.g. nnx.state(nnx.eval_shape(...))); its leaves give the
      expected target shapes and dtypes.
    source_name: how to name the source in messages (usually its file name).
    defaults: {target path: value} for leaves deliberately not filled from the source
      (state the official checkpoint does not have, e.g. a counter).
    hint: optional fn(missing_keys, unexpected_keys, misshaped_keys) -> extra sentence for
      the error (e.g. 'this looks like a VAR transformer checkpoint').
  Returns:
    An nnx.State shaped like `target` holding the converted arrays.
  Raises:
    ConversionError naming every missing, unexpected and mis-shaped key, and every tensor with
    unusable values (see `value_problem`).
  """
  leaves = flat_leaves(target)
  defaults = {tuple(p): v for p, v in (defaults or {}).items()}
  # Programming errors of the plan itself (not the user's file): fail loudly and separately.
  planned = {}
  for e in plan:
    if e.target_path not in leaves:
      raise AssertionError(f"conversion plan targets {path_str(e.target_path)}, which the model lacks")
    if e.target_path in planned:
      raise AssertionError(
        f"conversion plan fills {path_str(e.target_path)} twice ({planned[e.target_path]} and {e.source_key})"
      )
    planned[e.target_path] = e.source_key
  unfilled = [p for p in leaves if p not in planned and p not in defaults]
  if unfilled:
    raise AssertionError(
      "conversion plan leaves model variables unfilled: " + ", ".join(path_str(p) for p in unfilled[:20])
    )
  keys = [e.source_key for e in plan]
  if len(set(keys)) != len(keys):
    raise AssertionError("conversion plan uses a source key twice")

  remaining = dict(state_dict)
  missing, misshaped, bad_keys, bad_values, converted = [], [], [], [], {}
  for e in plan:
    if e.source_key not in remaining:
      missing.append(e.source_key)
      continue
    x = np.asarray(remaining.pop(e.source_key))  # each source tensor is used exactly once
    if tuple(x.shape) != tuple(e.source_shape):
      misshaped.append(f"{e.source_key}: has shape {tuple(x.shape)}, expected {tuple(e.source_shape)}")
      bad_keys.append(e.source_key)
      continue
    want = leaves[e.target_path]
    problem = value_problem(x, want.dtype)
    if problem:
      bad_values.append(f"{e.source_key}: {problem}")
      continue
    y = e.transform(x)
    if tuple(y.shape) != tuple(want.shape):  # a transform bug, not a file problem
      raise AssertionError(
        f"{e.source_key} -> {path_str(e.target_path)}: transformed shape {y.shape} != model shape {want.shape}"
      )
    converted[e.target_path] = np.asarray(y, dtype=want.dtype)
  unexpected = sorted(remaining)
  if missing or unexpected or misshaped or bad_values:
    parts = [
      f"{source_name} does not match the expected state_dict ({len(plan)} keys expected, {len(state_dict)} found):"
      if missing or unexpected or misshaped
      else f"{source_name} holds tensors that would convert into broken weights:"
    ]
    if missing:
      parts.append(f"missing {len(missing)} key(s):" + _describe(missing))
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} key(s):" + _describe(unexpected))
    if misshaped:
      parts.append(f"wrong shape for {len(misshaped)} key(s):" + _describe(misshaped))
    if bad_values:
      parts.append(f"unusable values in {len(bad_values)} tensor(s):" + _describe(bad_values))
    if hint is not None:
      extra = hint(missing, unexpected, bad_keys)
      if extra:
        parts.append(extra)
    raise ConversionError("\n".join(parts))

  def fill(path, var):
    path = tuple(path)
    if path in converted:
      return var.replace(jax.numpy.asarray(converted[path]))
    want = leaves[path]
    value = jax.numpy.asarray(defaults[path], dtype=want.dtype)
    if value.shape != tuple(want.shape):
      raise AssertionError(f"default for {path_str(path)} has shape {value.shape}, model {want.shape}")
    return var.replace(value)

  flat = [(tuple(p), fill(p, v)) for p, v in nnx.to_flat_state(target)]
  return nnx.from_flat_state(flat)
