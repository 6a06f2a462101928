"""Parameter checkpoints through orbax (training state: hmar_jax/training/checkpointing.py).

Everything is stored as a nested dict of arrays (NNX's "pure dict" form), so a
checkpoint does not depend on module classes, and a mismatch between checkpoint and
model is reported key by key before anything is loaded. Orbax writes into a temporary
directory and renames it when complete, so an interrupted save never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

_PARAMS_DIR = "params"
_META_FILE = "hmar_jax_meta.json"


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree does not match the model it is loaded into."""


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
  """A checkpointer that reads / writes from this process alone (no barrier with other processes):
  parameter checkpoints hold host arrays that one process writes (process 0) or every process reads."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(
    multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def _pure_state(module_or_state: Any, variable_filter=nnx.Param) -> dict:
  if isinstance(module_or_state, nnx.Module):
    module_or_state = nnx.state(module_or_state, variable_filter)
  if isinstance(module_or_state, nnx.State):
    return nnx.to_pure_dict(module_or_state)
  if isinstance(module_or_state, Mapping):
    return dict(module_or_state)
  raise TypeError(f"expected an nnx.Module, nnx.State or dict, got {type(module_or_state).__name__}")


def compare_trees(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
  """Lists, by key path, what differs between two nested dicts of arrays/shape-structs.

  Returns:
    Human-readable problems ('missing key a/b', 'unexpected key c', 'shape of d: ...'); empty if they match.
  """
  want, got = _flatten(expected), _flatten(found)
  problems = [f"missing key {k}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected key {k}" for k in sorted(got.keys() - want.keys())]
  for k in sorted(want.keys() & got.keys()):
    ws, gs = tuple(np.shape(want[k])), tuple(np.shape(got[k]))
    if ws != gs:
      problems.append(f"shape of {k}: checkpoint has {gs}, model expects {ws}")
  return problems


def save_params(
  directory: str | os.PathLike,
  module_or_state: Any,
  *,
  metadata: Mapping[str, Any] | None = None,
  variable_filter=nnx.Param,
) -> str:
  """Saves a module's variables (default: nnx.Param) as an orbax checkpoint.

  Args:
    directory: destination folder; must not exist yet (nothing is overwritten).
    module_or_state: an nnx.Module, an nnx.State, or a nested dict of arrays.
    metadata: optional JSON-serialisable facts stored beside the arrays (e.g. the config).
    variable_filter: which NNX variables to save when given a module.
  Returns:
    The absolute path written.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"checkpoint destination {directory} already exists; refusing to overwrite it")
  tree = _pure_state(module_or_state, variable_filter)
  os.makedirs(directory)
  with _this_process_checkpointer() as ckptr:
    ckptr.save(os.path.join(directory, _PARAMS_DIR), tree)
    ckptr.wait_until_finished()
  with open(os.path.join(directory, _META_FILE), "w") as f:
    json.dump(dict(metadata or {}), f, indent=1, sort_keys=True, default=str)
  return directory


def load_metadata(directory: str | os.PathLike) -> dict:
  path = os.path.join(os.fspath(directory), _META_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def restore_params(directory: str | os.PathLike, module: nnx.Module, *, variable_filter=nnx.Param) -> nnx.Module:
  """Loads parameters saved by `save_params` into `module` in place (and returns it).

  The checkpoint's key paths and shapes are compared with the module's first; any
  missing, unexpected or mis-shaped key raises CheckpointMismatchError naming it, and
  the module is left untouched.
  """
  directory = os.path.abspath(os.fspath(directory))
  path = os.path.join(directory, _PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} is not an hmar_jax parameter checkpoint (no '{_PARAMS_DIR}/' inside)")
  state = nnx.state(module, variable_filter)
  target = nnx.to_pure_dict(state)
  with _this_process_checkpointer() as ckptr:
    stored = ckptr.metadata(path)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    problems = compare_trees(target, _as_dict(stored_tree))
    if problems:
      raise CheckpointMismatchError(
        f"checkpoint {directory} does not match the model: "
        + "; ".join(problems[:20])
        + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else "")
      )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = ckptr.restore(path, abstract)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(module, state)
  return module


def read_params_tree(directory: str | os.PathLike) -> dict:
  """Every array of a `save_params` checkpoint as host numpy, as a nested dict (list groups keyed
  by index strings '0', '1', ...)."""
  directory = os.path.abspath(os.fspath(directory))
  path = os.path.join(directory, _PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} is not an hmar_jax parameter checkpoint (no '{_PARAMS_DIR}/' inside)")
  with _this_process_checkpointer() as ckptr:
    stored = ckptr.metadata(path)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), stored_tree)
    restored = ckptr.restore(path, target)
  return _as_dict(jax.tree.map(np.asarray, restored))


def _as_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
    return {str(i): _as_dict(v) for i, v in enumerate(tree)}
  return tree
