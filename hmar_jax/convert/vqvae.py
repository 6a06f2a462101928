"""Official VQVAE state_dict (e.g. vae_ch160v4096z32.pth) -> hmar_jax VQVAE.

The NNX module tree mirrors the official one, so the key map is a rename:

  official key                                   NNX path                           transform
  encoder|decoder.<...>.<conv>.weight            encoder|decoder.<...>.<conv>.kernel  (O,I,kh,kw)->(kh,kw,I,O)
  encoder|decoder.<...>.<norm>.weight            ....<norm>.scale                      -
  <any>.bias                                     <any>.bias                            -
  quant_conv.weight / post_quant_conv.weight     quant_conv.kernel / ...               conv
  quantize.embedding.weight (V, C)               quantizer.embedding.embedding         -
  quantize.quant_resi.qresi_ls.{k}.weight|bias   quantizer.phis.{k}.conv.kernel|bias   conv
    (share_quant_resi == 1: quantize.quant_resi.qresi.*; == 0: quantize.quant_resi.{k}.*)
  quantize.ema_vocab_hit_SV (S, V)               quantizer.ema_vocab_hit               -

(`...down.{i}.block.{j}`, `...down.{i}.attn.{j}`, `down.{i}.downsample.conv`, `up.{i}.upsample.conv`,
`mid.block_1|attn_1|block_2` keep their official names and indices.) The only NNX variable
with no official tensor is quantizer.record_hit (the EMA step counter, official
`record_hit`, a Python int), set to 0.

As the official VQVAE.load_state_dict does, an `ema_vocab_hit_SV` with a different number of
scales (a checkpoint used with another patch_nums) is replaced by zeros.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.convert.common import (
  Entry,
  apply_plan,
  conv_kernel,
  conv_source_shape,
  flat_leaves,
  identity,
  load_torch_checkpoint,
  path_str,
)
from hmar_jax.tokenizer.vqvae import CHECKPOINT_VARIABLES, VQVAE, abstract_vqvae, save_vqvae, validate_config

EMA_KEY = "quantize.ema_vocab_hit_SV"
EMBED_KEY = "quantize.embedding.weight"
# Key prefixes that identify other official checkpoints (VAR / HMAR transformers).
TRANSFORMER_MARKERS = (
  "blocks.",
  "word_embed.",
  "class_emb.",
  "lvl_embed.",
  "pos_start",
  "pos_1LC",
  "head.",
  "head_nm.",
  "base_blocks.",
  "ns_blocks.",
  "mask_blocks.",
)


def _source_for(path: tuple, leaf: Any, share_quant_resi: int):
  """NNX path -> (official key, transform, expected source shape); None for counter state."""
  shape = tuple(leaf.shape)
  *mods, name = path
  if path == ("quantizer", "record_hit"):
    return None
  if path == ("quantizer", "ema_vocab_hit"):
    return EMA_KEY, identity, shape
  if path == ("quantizer", "embedding", "embedding"):
    return EMBED_KEY, identity, shape
  if mods[:2] == ["quantizer", "phis"]:
    k = mods[2]
    assert mods[3:] == ["conv"], path
    prefix = {0: f"quantize.quant_resi.{k}", 1: "quantize.quant_resi.qresi"}.get(
      share_quant_resi, f"quantize.quant_resi.qresi_ls.{k}"
    )
    mods = prefix.split(".")
  key = ".".join(str(m) for m in mods)
  if name == "kernel" and len(shape) == 4:
    return f"{key}.weight", conv_kernel, conv_source_shape(shape)
  if name == "scale":
    return f"{key}.weight", identity, shape
  if name == "bias":
    return f"{key}.bias", identity, shape
  raise AssertionError(f"no official key known for {path_str(path)}")


def vqvae_plan(target: nnx.State, share_quant_resi: int) -> tuple[list[Entry], dict]:
  """The conversion plan for a VQVAE state (abstract or concrete) and its no-source defaults."""
  plan, defaults = [], {}
  for path, leaf in flat_leaves(target).items():
    src = _source_for(path, leaf, share_quant_resi)
    if src is None:
      defaults[path] = np.zeros(leaf.shape, leaf.dtype)
    else:
      key, fn, shape = src
      plan.append(Entry(key, path, shape, fn))
  return plan, defaults


def expected_state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  """{official key: shape} of the official VQVAE built with `config` (no tensors allocated)."""
  c = validate_config(config)
  plan, _ = vqvae_plan(nnx.state(abstract_vqvae(config), CHECKPOINT_VARIABLES), c["share_quant_resi"])
  return {e.source_key: e.source_shape for e in plan}


def _hint(config: dict, num_expected: int):
  def hint(missing, unexpected, misshaped):
    notes = []
    if len(missing) == num_expected:
      notes.append("None of the official VQVAE keys (encoder.*, decoder.*, quantize.*) is present.")
    if any(k.startswith(TRANSFORMER_MARKERS) for k in unexpected):
      notes.append(
        "The file looks like a VAR/HMAR transformer checkpoint, not a VQVAE: use `python -m hmar_jax.convert var|hmar`."
      )
    if len(misshaped) > max(3, num_expected // 10):
      notes.append(
        "Many shapes differ: the checkpoint was made with another architecture (ch, ch_mult, "
        "num_res_blocks, z_channels) than the config; pass the matching --config."
      )
    if EMBED_KEY in misshaped:
      notes.append(
        f"Codebook size mismatch: the config has vocab_size={config['vocab_size']} and "
        f"z_channels={config['z_channels']}."
      )
    return " ".join(notes)

  return hint


def convert_vqvae_state_dict(
  state_dict: Mapping[str, np.ndarray], config: Any, *, source_name: str = "state_dict", log=None
):
  """Official VQVAE state_dict -> a concrete hmar_jax VQVAE holding its weights.

  Args:
    state_dict: {official key: NumPy array} (torch tensors converted with .numpy()).
    config: the VQVAE architecture (configs/vqvae.py); must match the checkpoint.
    source_name: the source's name for error messages.
    log: optional fn(str) for notes (e.g. a reset usage buffer).
  Raises:
    ConversionError naming every missing, unexpected or mis-shaped key.
  """
  c = validate_config(config)
  abstract = abstract_module(lambda rngs: VQVAE(config, rngs=rngs))
  graphdef, target, rest = nnx.split(abstract, CHECKPOINT_VARIABLES, ...)
  if flat_leaves(rest):
    raise AssertionError(f"VQVAE has variables outside {CHECKPOINT_VARIABLES}: {list(flat_leaves(rest))}")
  plan, defaults = vqvae_plan(target, c["share_quant_resi"])
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  num_scales, vocab = len(c["patch_nums"]), c["vocab_size"]
  ema = sd.get(EMA_KEY)
  if ema is not None and ema.ndim == 2 and ema.shape[1] == vocab and ema.shape[0] != num_scales:
    # Official VQVAE.load_state_dict: keep the model's own (zero) buffer in this case.
    (log or (lambda s: None))(
      f"note: {EMA_KEY} has {ema.shape[0]} scales, the config {num_scales}; "
      f"codebook usage statistics reset to zero (as the official loader does)"
    )
    sd[EMA_KEY] = np.zeros((num_scales, vocab), np.float32)
  state = apply_plan(sd, plan, target, source_name=source_name, defaults=defaults, hint=_hint(c, len(plan)))
  return nnx.merge(graphdef, state, rest)


def convert_vqvae_file(src: str | os.PathLike, dst: str | os.PathLike, config: Any, *, log=print) -> str:
  """Converts an official VQVAE .pth into an hmar_jax checkpoint directory `dst` (must not exist).

  Returns the absolute destination path. Load it with hmar_jax.tokenizer.load_vqvae(dst).
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst):
    raise FileExistsError(f"destination {dst} already exists; refusing to overwrite it")
  sd = load_torch_checkpoint(src, what="VQVAE checkpoint")
  model = convert_vqvae_state_dict(sd, config, source_name=os.path.basename(os.fspath(src)), log=log)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  out = save_vqvae(
    dst, model, extra_metadata={"converted_from": os.path.abspath(os.fspath(src)), "num_source_tensors": len(sd)}
  )
  log(f"converted {len(sd)} tensors ({n:,} parameters) from {src} -> {out}")
  return out
