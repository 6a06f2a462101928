"""Block parameter layouts: a list of blocks, or one stack of blocks for `jax.lax.scan`.

List layout (`model.scan_layers = False`, what the converters and the official checkpoints use):
  params['blocks'] = {0: {...}, 1: {...}, ...}
Scan layout (`model.scan_layers = True`, compiled once per stack rather than once per block):
  params['blocks'] = {...} with every leaf stacked on a leading 'layers' axis.
The same holds for 'mask_blocks'. These functions convert pure-dict parameter trees (as stored by
`hmar_jax.checkpoint.save_params`) between the two, so any checkpoint loads into either model.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from hmar_jax.models.transformer import BLOCK_GROUPS


def is_list_layout(group: Mapping) -> bool:
  """True when a block group's keys are the block indices 0..n-1."""
  keys = list(group.keys())
  return bool(keys) and all(str(k).isdigit() for k in keys)


def to_scan_layout(params: Mapping[str, Any]) -> dict:
  """List-layout groups stacked on a new leading axis; groups already stacked are kept."""
  out = dict(params)
  for name in BLOCK_GROUPS:
    group = params.get(name)
    if group is None or not is_list_layout(group):
      continue
    blocks = [group[k] for k in sorted(group, key=lambda k: int(k))]
    leaves = [jax.tree.leaves(b) for b in blocks]
    treedef = jax.tree.structure(blocks[0])
    # One copy per parameter, side by side: numpy copies outside Python's lock, and a d16 model's
    # blocks are a gigabyte to restack when a list-layout checkpoint is loaded for sampling.
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
      stacked = pool.map(lambda xs: np.stack([np.asarray(x) for x in xs]), zip(*leaves, strict=True))
      out[name] = jax.tree.unflatten(treedef, list(stacked))
  return out


def to_list_layout(params: Mapping[str, Any]) -> dict:
  """Stacked groups split into {0: ..., 1: ..., ...}; groups already in list layout are kept."""
  out = dict(params)
  for name in BLOCK_GROUPS:
    group = params.get(name)
    if group is None or is_list_layout(group):
      continue
    depth = jax.tree.leaves(group)[0].shape[0]
    out[name] = {i: jax.tree.map(lambda a, i=i: np.asarray(a)[i], group) for i in range(depth)}
  return out


def to_layout(params: Mapping[str, Any], scan_layers: bool) -> dict:
  return to_scan_layout(params) if scan_layers else to_list_layout(params)


def to_layout_shapes(params: Mapping[str, Any], scan_layers: bool) -> dict:
  """`to_layout` for a tree of ShapeDtypeStructs: the shapes the same parameters have in the other
  layout (for checking a checkpoint's stored shapes without building a model in its layout)."""
  out = dict(params)
  for name in BLOCK_GROUPS:
    group = params.get(name)
    if group is None or is_list_layout(group) != scan_layers:
      continue
    if scan_layers:
      depth, first = len(group), group[min(group, key=lambda k: int(k))]
      out[name] = jax.tree.map(lambda a, n=depth: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), first)
    else:
      depth = jax.tree.leaves(group)[0].shape[0]
      one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), group)
      out[name] = {i: one for i in range(depth)}
  return out
