"""Official VAR transformer state_dicts (var_d16.pth ... var_d30.pth) -> hmar_jax ScaleTransformer.

The same layout is the HMAR next-scale training checkpoint (official models/nsp.py
NextScalePrediction, whose state_dict keys equal VAR's); only the attention buffer differs
(block-diagonal instead of block-causal). Key map (C width, H heads, V vocab, L tokens, S scales;
torch Linear weight (O, I) -> NNX kernel (I, O)):

  official key                         shape            NNX path                         transform
  word_embed.weight / .bias            (C, Cvae) / (C,) word_embed.kernel / .bias        .T / -
  class_emb.weight                     (K + 1, C)       class_emb.embedding              -
  pos_start                            (1, first_l, C)  pos_start                        -
  pos_1LC                              (1, L, C)        pos_1LC                          -
  lvl_embed.weight                     (S, C)           lvl_embed.embedding              -
  blocks.{i}.ada_lin.1.weight / .bias  (6C, C) / (6C,)  blocks.{i}.ada_lin.kernel / .bias .T / -
  blocks.{i}.attn.mat_qkv.weight       (3C, C)          blocks.{i}.attn.qkv (C, 3, C)    .T.reshape
  blocks.{i}.attn.q_bias / .v_bias     (C,)             blocks.{i}.attn.q_bias / .v_bias -
  blocks.{i}.attn.scale_mul_1H11       (1, H, 1, 1)     blocks.{i}.attn.scale_mul (H,)   reshape
  blocks.{i}.attn.proj.weight / .bias  (C, C) / (C,)    blocks.{i}.attn.proj.*           .T / -
  blocks.{i}.ffn.fc1|fc2.weight / .bias                 blocks.{i}.ffn.fc1|fc2.*         .T / -
  head_nm.ada_lin.1.weight / .bias     (2C, C) / (2C,)  head_nm.ada_lin.kernel / .bias   .T / -
  head.weight / .bias                  (V, C) / (V,)    head.kernel / .bias              .T / -

Buffers, checked and not stored: blocks.{i}.attn.zero_k_bias (must be zero), lvl_1L (must be the
scale ids of the config's patch_nums), attn_bias_for_masking (1, 1, L, L) (0 where attention is
allowed, -inf elsewhere; it must match the config's pattern, which catches converting a VAR
checkpoint into an HMAR config and vice versa).

The target model must have no masked-prediction branch (model.mask_layers == 0): a VAR / NSP
checkpoint has none. HMAR's full inference checkpoints go through hmar_jax/convert/hmar.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import ml_collections
import numpy as np
from flax import nnx

from hmar_jax import checkpoint
from hmar_jax.abstract import abstract_module
from hmar_jax.convert.common import ConversionError, Entry, apply_plan, identity, linear_kernel, load_torch_checkpoint
from hmar_jax.models import ScaleTransformer, check_model_config, count_params, model_config
from hmar_jax.models.config import upgrade_model_config
from pallas_kernels import patterns

BUFFER_KEYS = ("lvl_1L", "attn_bias_for_masking")
VAR_LAYOUTS = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


def model_cfg(config) -> ml_collections.ConfigDict:
  """The model block of a full config (with .model) or the block itself, as a copy in the list
  layout (converted checkpoints store blocks as a list; hmar_jax.models.layout stacks them)."""
  m = upgrade_model_config(config.model if "model" in config else config)
  m.scan_layers = False
  return m


def _qkv_kernel(width: int) -> Callable[[np.ndarray], np.ndarray]:
  # official view(B, L, 3, H, Dh): output channel o = k * C + h * Dh + d.
  return lambda w: np.transpose(w, (1, 0)).reshape(width, 3, width)


def block_entries(src: str, dst: tuple, m) -> list[Entry]:
  """Plan entries of one official AdaLNSelfAttn at key prefix `src` -> NNX path prefix `dst`."""
  c, h, hidden = m.width, m.num_heads, round(m.width * m.mlp_ratio)
  lin = lambda name, path, o, i: [  # noqa: E731
    Entry(f"{src}.{name}.weight", dst + path + ("kernel",), (o, i), linear_kernel),
    Entry(f"{src}.{name}.bias", dst + path + ("bias",), (o,), identity),
  ]
  out = lin("ada_lin.1", ("ada_lin",), 6 * c, c)
  out.append(Entry(f"{src}.attn.mat_qkv.weight", dst + ("attn", "qkv"), (3 * c, c), _qkv_kernel(c)))
  out.append(Entry(f"{src}.attn.q_bias", dst + ("attn", "q_bias"), (c,), identity))
  out.append(Entry(f"{src}.attn.v_bias", dst + ("attn", "v_bias"), (c,), identity))
  if m.attn_l2_norm:
    out.append(Entry(f"{src}.attn.scale_mul_1H11", dst + ("attn", "scale_mul"), (1, h, 1, 1), lambda x: x.reshape(-1)))
  out += lin("attn.proj", ("attn", "proj"), c, c)
  out += lin("ffn.fc1", ("ffn", "fc1"), hidden, c)
  out += lin("ffn.fc2", ("ffn", "fc2"), c, hidden)
  return out


def head_entries(src_nm: str, src_head: str, dst_nm: tuple, dst_head: tuple, m) -> list[Entry]:
  c = m.width
  return [
    Entry(f"{src_nm}.ada_lin.1.weight", dst_nm + ("ada_lin", "kernel"), (2 * c, c), linear_kernel),
    Entry(f"{src_nm}.ada_lin.1.bias", dst_nm + ("ada_lin", "bias"), (2 * c,), identity),
    Entry(f"{src_head}.weight", dst_head + ("kernel",), (m.vocab_size, c), linear_kernel),
    Entry(f"{src_head}.bias", dst_head + ("bias",), (m.vocab_size,), identity),
  ]


def embedding_entries(m, *, word_bias_key: str = "word_embed.bias") -> list[Entry]:
  c = m.width
  length = patterns.sequence_length(m.patch_nums)
  return [
    Entry("word_embed.weight", ("word_embed", "kernel"), (c, m.cvae), linear_kernel),
    Entry(word_bias_key, ("word_embed", "bias"), (c,), identity),
    Entry("class_emb.weight", ("class_emb", "embedding"), (m.num_classes + 1, c), identity),
    Entry("pos_start", ("pos_start",), (1, m.patch_nums[0] ** 2, c), identity),
    Entry("pos_1LC", ("pos_1LC",), (1, length, c), identity),
    Entry("lvl_embed.weight", ("lvl_embed", "embedding"), (len(m.patch_nums), c), identity),
  ]


def var_plan(m) -> list[Entry]:
  plan = embedding_entries(m)
  for i in range(m.depth):
    plan += block_entries(f"blocks.{i}", ("blocks", i), m)
  return plan + head_entries("head_nm", "head", ("head_nm",), ("head",), m)


def buffer_shapes(m, block_prefixes) -> dict[str, tuple]:
  length = patterns.sequence_length(m.patch_nums)
  out = {f"{p}.attn.zero_k_bias": (m.width,) for p in block_prefixes}
  out["lvl_1L"] = (1, length)
  out["attn_bias_for_masking"] = (1, 1, length, length)
  return out


def check_buffers(sd: dict, m, block_prefixes) -> list[str]:
  """Pops the official buffers from `sd` and returns the problems found (empty if all fine)."""
  problems = []
  expected = buffer_shapes(m, block_prefixes)
  for key, shape in expected.items():
    if key not in sd:
      problems.append(f"missing buffer {key}")
      continue
    x = np.asarray(sd.pop(key))
    if x.shape != shape:
      problems.append(f"buffer {key}: has shape {x.shape}, expected {shape}")
    elif key.endswith("zero_k_bias") and np.any(x != 0):
      problems.append(f"buffer {key} is not all zero")
    elif key == "lvl_1L" and not np.array_equal(x[0], patterns.scale_ids(m.patch_nums)):
      problems.append(f"buffer lvl_1L does not match patch_nums {tuple(m.patch_nums)}")
    elif key == "attn_bias_for_masking":
      allowed = patterns.dense_mask(m.patch_nums, m.pattern)
      if not (np.all(x[0, 0][allowed] == 0) and np.all(np.isneginf(x[0, 0][~allowed]))):
        other = [p for p in patterns.PATTERNS if p != m.pattern][0]
        problems.append(
          f"buffer attn_bias_for_masking is not the {m.pattern!r} mask of the config "
          f"(is the checkpoint a {other!r} model? VAR is block_causal, HMAR block_diagonal)"
        )
  return problems


def expected_var_shapes(config) -> dict[str, tuple[int, ...]]:
  """{official key: shape} of an official VAR / NSP state_dict for `config` (nothing allocated)."""
  m = model_cfg(config)
  shapes = {e.source_key: tuple(e.source_shape) for e in var_plan(m)}
  shapes.update(buffer_shapes(m, [f"blocks.{i}" for i in range(m.depth)]))
  return shapes


def run_plan(state_dict: Mapping[str, np.ndarray], m, plan: list[Entry], block_prefixes, source_name: str):
  """Checks buffers, applies `plan` to an abstract ScaleTransformer(m); returns a concrete model."""
  check_model_config(m)
  abstract = abstract_module(lambda rngs: ScaleTransformer(m, rngs=rngs))
  graphdef, target, rest = nnx.split(abstract, nnx.Param, ...)
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  buffer_problems = check_buffers(sd, m, block_prefixes)
  try:
    state = apply_plan(sd, plan, target, source_name=source_name)
  except ConversionError as e:
    if buffer_problems:
      raise ConversionError(f"{e}\nbuffer problems:\n  " + "\n  ".join(buffer_problems)) from None
    raise
  if buffer_problems:
    raise ConversionError(f"{source_name}: buffer problems:\n  " + "\n  ".join(buffer_problems))
  return nnx.merge(graphdef, state, rest)


def convert_var_state_dict(state_dict: Mapping[str, np.ndarray], config, *, source_name: str = "state_dict"):
  """Official VAR (or HMAR next-scale training) state_dict -> concrete ScaleTransformer.

  Args:
    state_dict: {official key: NumPy array}.
    config: a config with `.model` (configs/var.py:d16 ...) or the model block; mask_layers
      must be 0; pattern 'block_causal' for VAR checkpoints, 'block_diagonal' for HMAR NSP ones.
  Raises:
    ConversionError naming every missing, unexpected or mis-shaped key and bad buffer.
  """
  m = model_cfg(config)
  if m.mask_layers:
    raise ConversionError(
      f"a VAR / next-scale checkpoint has no masked-prediction branch; use a "
      f"config with model.mask_layers = 0 (got {m.mask_layers})"
    )
  if any(k.startswith(("base_blocks.", "ns_blocks.", "mask_blocks.")) for k in state_dict):
    raise ConversionError(
      f"{source_name} has base_blocks / ns_blocks / mask_blocks keys, i.e. it is an "
      "official HMAR inference checkpoint: convert it with convert_hmar_state_dict "
      "(`python -m hmar_jax.convert hmar`)"
    )
  prefixes = [f"blocks.{i}" for i in range(m.depth)]
  return run_plan(state_dict, m, var_plan(m), prefixes, source_name)


def infer_model_config(state_dict: Mapping[str, np.ndarray], *, kind: str) -> ml_collections.ConfigDict:
  """The model config of an official VAR ('var') or full HMAR ('hmar') state_dict, from shapes."""
  try:
    width = state_dict["pos_1LC"].shape[-1]
    length = state_dict["pos_1LC"].shape[1]
    vocab = state_dict[("ns_head" if kind == "hmar" else "head") + ".weight"].shape[0]
    cvae = state_dict["word_embed.weight"].shape[1]
    classes = state_dict["class_emb.weight"].shape[0] - 1
  except KeyError as e:
    raise ConversionError(f"cannot infer the model: key {e.args[0]} missing (is this a {kind} checkpoint?)") from None
  block_ids = lambda p: {int(k.split(".")[1]) for k in state_dict if k.startswith(p + ".")}  # noqa: E731
  if kind == "hmar":
    base, ns = block_ids("base_blocks"), block_ids("ns_blocks")
    depth, mask_layers = len(base) + len(ns), len(ns)
    first = "ns_blocks.0" if ns else "base_blocks.0"
  else:
    depth, mask_layers, first = len(block_ids("blocks")), 0, "blocks.0"
  if length not in VAR_LAYOUTS:
    raise ConversionError(f"pos_1LC has {length} positions; known layouts: {sorted(VAR_LAYOUTS)}")
  scale_key = f"{first}.attn.scale_mul_1H11"
  heads = state_dict[scale_key].shape[1] if scale_key in state_dict else width // 64
  m = model_config(
    depth,
    kind=kind,
    patch_nums=VAR_LAYOUTS[length],
    width=width,
    num_heads=heads,
    vocab_size=vocab,
    cvae=cvae,
    num_classes=classes,
    mask_layers=mask_layers,
  )
  m.attn_l2_norm = scale_key in state_dict
  bias = state_dict.get("attn_bias_for_masking")
  if kind == "var" and bias is not None and bias.shape == (1, 1, length, length):
    diagonal = patterns.dense_mask(VAR_LAYOUTS[length], "block_diagonal")
    if np.all(np.isneginf(np.asarray(bias)[0, 0][~diagonal])):
      m.pattern = "block_diagonal"  # an HMAR next-scale training checkpoint (same keys as VAR)
  return m


def convert_file(
  src: str | os.PathLike, dst: str | os.PathLike, config, *, kind: str, convert_fn: Callable[..., nnx.Module], log=print
) -> str:
  """Reads an official .pth, converts it with `convert_fn(sd, model_config, source_name=...)` and
  writes an hmar_jax parameter checkpoint `dst` (must not exist) with the model config stored
  beside the weights. config: None infers the architecture from the shapes. Returns dst."""
  sd = load_torch_checkpoint(src, what=f"{kind.upper()} checkpoint")
  m = model_cfg(config) if config is not None else infer_model_config(sd, kind=kind)
  model = convert_fn(sd, m, source_name=os.path.basename(os.fspath(src)))
  out = checkpoint.save_params(
    dst, model, metadata={"converted_from": os.path.abspath(os.fspath(src)), "model": m.to_dict()}
  )
  log(f"converted {len(sd)} tensors ({count_params(model):,} parameters) from {src} -> {out}")
  return out


def convert_var_file(src: str | os.PathLike, dst: str | os.PathLike, config=None, *, log=print) -> str:
  """Converts an official VAR .pth into an hmar_jax parameter checkpoint `dst` (must not exist).

  config: None infers the architecture from the shapes (infer_model_config). Returns dst.
  """
  return convert_file(src, dst, config, kind="var", convert_fn=convert_var_state_dict, log=log)
