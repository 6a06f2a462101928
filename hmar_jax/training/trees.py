"""Nested-dict helpers for parameter trees (NNX 'pure dicts': {name: {name: array}})."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def split_tree(tree: Mapping, keep: Callable[[str], bool], prefix: str = "") -> tuple[dict, dict]:
  """(leaves whose '/'-joined path `keep` accepts, the other leaves), both nested like `tree`.

  Empty branches are dropped from both halves.
  """
  kept, rest = {}, {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      a, b = split_tree(value, keep, name + "/")
      if a:
        kept[key] = a
      if b:
        rest[key] = b
    elif keep(name):
      kept[key] = value
    else:
      rest[key] = value
  return kept, rest


def merge_trees(a: Mapping, b: Mapping) -> dict:
  """The union of two nested dicts with disjoint leaves (raises on a leaf present in both)."""
  out = dict(a)
  for key, value in b.items():
    if key in out:
      if isinstance(out[key], Mapping) and isinstance(value, Mapping):
        out[key] = merge_trees(out[key], value)
      else:
        raise ValueError(f"merge_trees: {key!r} is in both trees")
    else:
      out[key] = value
  return out


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
  """A copy of `tree` with `path` set to value (copies only along the path)."""
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def has_path(tree: Mapping, path: tuple[str, ...]) -> bool:
  try:
    get_path(tree, path)
  except (KeyError, TypeError):
    return False
  return True


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a/b': leaf, ...}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat
