"""Official HMAR inference state_dicts (hmar-d16.pth ... hmar-d30.pth) -> hmar_jax ScaleTransformer.

The released files are `HMAR.state_dict()` of official models/hmar.py (sample.py loads them with
strict load_state_dict): the depth blocks split into base_blocks (first depth - N) and ns_blocks
(last N), plus mask_blocks (N), two heads and the mask embedding; N = n_layers_train = 8. Their
`word_embed` is a bias-free Linear plus a separate `word_embed_bias` (how
load_base_and_ns_state_dict / load_mask_dict filled them from the next-scale and masked-prediction
training checkpoints). Key map, on top of hmar_jax/convert/var.py's per-block and head maps:

  official key                 NNX path
  word_embed.weight            word_embed.kernel (transposed)
  word_embed_bias              word_embed.bias
  class_emb.weight, pos_start, pos_1LC, lvl_embed.weight        as VAR
  base_blocks.{i}.*            blocks.{i}.*                  i < depth - N
  ns_blocks.{j}.*              blocks.{depth - N + j}.*
  mask_blocks.{j}.*            mask_blocks.{j}.*
  ns_head_nm.*, ns_head.*      head_nm.*, head.*
  mask_head_nm.*, mask_head.*  mask_head_nm.*, mask_head.*
  mask_embed.weight (1, C)     mask_embed (1, C)

Buffers checked and dropped: every block's attn.zero_k_bias, lvl_1L and attn_bias_for_masking
(block-diagonal). The target config needs pattern 'block_diagonal' and mask_layers = N.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from hmar_jax.convert.common import ConversionError, Entry, identity
from hmar_jax.convert.var import (
  block_entries,
  buffer_shapes,
  convert_file,
  embedding_entries,
  head_entries,
  model_cfg,
  run_plan,
)


def _block_prefixes(m) -> list[tuple[str, tuple]]:
  n, first = m.mask_layers, m.depth - m.mask_layers
  out = [(f"base_blocks.{i}", ("blocks", i)) for i in range(first)]
  out += [(f"ns_blocks.{j}", ("blocks", first + j)) for j in range(n)]
  out += [(f"mask_blocks.{j}", ("mask_blocks", j)) for j in range(n)]
  return out


def hmar_plan(m) -> list[Entry]:
  plan = embedding_entries(m, word_bias_key="word_embed_bias")
  for src, dst in _block_prefixes(m):
    plan += block_entries(src, dst, m)
  plan += head_entries("ns_head_nm", "ns_head", ("head_nm",), ("head",), m)
  plan += head_entries("mask_head_nm", "mask_head", ("mask_head_nm",), ("mask_head",), m)
  plan.append(Entry("mask_embed.weight", ("mask_embed",), (1, m.width), identity))
  return plan


def _check_hmar_config(m) -> None:
  if m.pattern != "block_diagonal" or m.mask_layers <= 0:
    raise ConversionError(
      "an official HMAR checkpoint needs an HMAR config (pattern 'block_diagonal', "
      f"model.mask_layers = n_layers_train > 0); got pattern {m.pattern!r}, "
      f"mask_layers {m.mask_layers}"
    )


def expected_hmar_shapes(config) -> dict[str, tuple[int, ...]]:
  """{official key: shape} of an official HMAR state_dict for `config` (nothing allocated)."""
  m = model_cfg(config)
  _check_hmar_config(m)
  shapes = {e.source_key: tuple(e.source_shape) for e in hmar_plan(m)}
  shapes.update(buffer_shapes(m, [p for p, _ in _block_prefixes(m)]))
  return shapes


def convert_hmar_state_dict(state_dict: Mapping[str, np.ndarray], config, *, source_name: str = "state_dict"):
  """Official HMAR state_dict -> concrete ScaleTransformer with the masked-prediction branch.

  Args:
    state_dict: {official key: NumPy array}.
    config: configs/hmar.py:d16-style config (or its .model); mask_layers must equal the
      checkpoint's number of ns_blocks (8 for the released models).
  Raises:
    ConversionError naming every missing, unexpected or mis-shaped key and bad buffer.
  """
  m = model_cfg(config)
  _check_hmar_config(m)
  if any(k.startswith("blocks.") for k in state_dict) and not any(
    k.startswith("base_blocks.") or k.startswith("ns_blocks.") for k in state_dict
  ):
    raise ConversionError(
      f"{source_name} has 'blocks.*' keys, i.e. it is a VAR / next-scale training "
      "checkpoint, not an HMAR inference one: convert it with "
      "convert_var_state_dict (`python -m hmar_jax.convert var`)"
    )
  return run_plan(state_dict, m, hmar_plan(m), [p for p, _ in _block_prefixes(m)], source_name)


def convert_hmar_file(src: str | os.PathLike, dst: str | os.PathLike, config=None, *, log=print) -> str:
  """Converts an official HMAR .pth into an hmar_jax parameter checkpoint `dst` (must not exist).

  config: None infers the architecture from the shapes. Returns dst.
  """
  return convert_file(src, dst, config, kind="hmar", convert_fn=convert_hmar_state_dict, log=log)
