"""Official MAR state_dicts (LTH14/mar checkpoint-last.pth) -> hmar_jax MARBackbone.

The official checkpoint file is a dict {'model': state_dict, 'model_ema': state_dict, ...} (util/
misc.py save_model; 'model_ema' holds the EMA weights the official evaluation samples with,
main_mar.py / engine_mar.py evaluate(use_ema=True)). Its keys are MAR's own plus 'diffloss.*' (the
head, hmar_jax/convert/diffloss.py); this converter takes every key except 'diffloss.*'. Key map
(E encoder width, D decoder width, buf buffer_size, L seq_len, T token_embed_dim; torch Linear
weight (O, I) -> NNX kernel (I, O)):

  official key                                  shape                NNX path                    transform
  class_emb.weight                              (class_num, E)       class_emb.embedding         -
  fake_latent                                   (1, E)               fake_latent                 -
  z_proj.weight / .bias                         (E, T) / (E,)        z_proj.kernel / .bias       .T / -
  z_proj_ln.weight / .bias                      (E,)                 z_proj_ln.scale / .bias     -
  encoder_pos_embed_learned                     (1, buf + L, E)      same name                   -
  encoder_blocks.{i}.norm1|norm2.weight / .bias (E,)                 ...norm1|norm2.scale / .bias -
  encoder_blocks.{i}.attn.qkv.weight / .bias    (3E, E) / (3E,)      ...attn.qkv.kernel / .bias  .T / -
  encoder_blocks.{i}.attn.proj.weight / .bias   (E, E) / (E,)        ...attn.proj.kernel / .bias .T / -
  encoder_blocks.{i}.mlp.fc1|fc2.weight / .bias                      ...mlp.fc1|fc2.*            .T / -
  encoder_norm.weight / .bias                   (E,)                 encoder_norm.scale / .bias  -
  decoder_embed.weight / .bias                  (D, E) / (D,)        decoder_embed.*             .T / -
  mask_token                                    (1, 1, D)            mask_token                  -
  decoder_pos_embed_learned                     (1, buf + L, D)      same name                   -
  decoder_blocks.{i}.*                          as the encoder's     decoder_blocks[i].*
  decoder_norm.weight / .bias                   (D,)                 decoder_norm.scale / .bias  -
  diffusion_pos_embed_learned                   (1, L, D)            same name                   -

The fused qkv keeps its layout: output channel o = k * D + h * Dh + d (q, k, v; then heads), which
MARBackbone reshapes as (3, H, Dh) like timm's Attention.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import numpy as np
from flax import nnx

from hmar_jax.convert.common import ConversionError, Entry, apply_plan, identity, linear_kernel
from hmar_jax.models import mar as mar_model

DIFFLOSS_PREFIX = "diffloss."


def _linear(src: str, dst: tuple, dout: int, din: int) -> list[Entry]:
  return [
    Entry(f"{src}.weight", dst + ("kernel",), (dout, din), linear_kernel),
    Entry(f"{src}.bias", dst + ("bias",), (dout,), identity),
  ]


def _norm(src: str, dst: tuple, dim: int) -> list[Entry]:
  return [
    Entry(f"{src}.weight", dst + ("scale",), (dim,), identity),
    Entry(f"{src}.bias", dst + ("bias",), (dim,), identity),
  ]


def _block(src: str, dst: tuple, dim: int, mlp_ratio: float) -> list[Entry]:
  hidden = int(dim * mlp_ratio)
  return (
    _norm(f"{src}.norm1", dst + ("norm1",), dim)
    + _linear(f"{src}.attn.qkv", dst + ("attn", "qkv"), 3 * dim, dim)
    + _linear(f"{src}.attn.proj", dst + ("attn", "proj"), dim, dim)
    + _norm(f"{src}.norm2", dst + ("norm2",), dim)
    + _linear(f"{src}.mlp.fc1", dst + ("mlp", "fc1"), hidden, dim)
    + _linear(f"{src}.mlp.fc2", dst + ("mlp", "fc2"), dim, hidden)
  )


def mar_backbone_entries(config) -> list[Entry]:
  """One plan Entry per official MAR key except 'diffloss.*' (see the module docstring)."""
  c = config
  e, d = c.encoder_embed_dim, c.decoder_embed_dim
  n = mar_model.seq_len(c)
  buf = c.buffer_size
  plan = [
    Entry("class_emb.weight", ("class_emb", "embedding"), (c.class_num, e), identity),
    Entry("fake_latent", ("fake_latent",), (1, e), identity),
    *_linear("z_proj", ("z_proj",), e, mar_model.token_embed_dim(c)),
    *_norm("z_proj_ln", ("z_proj_ln",), e),
    Entry("encoder_pos_embed_learned", ("encoder_pos_embed_learned",), (1, buf + n, e), identity),
  ]
  for i in range(c.encoder_depth):
    plan += _block(f"encoder_blocks.{i}", ("encoder_blocks", i), e, c.mlp_ratio)
  plan += _norm("encoder_norm", ("encoder_norm",), e)
  plan += _linear("decoder_embed", ("decoder_embed",), d, e)
  plan += [
    Entry("mask_token", ("mask_token",), (1, 1, d), identity),
    Entry("decoder_pos_embed_learned", ("decoder_pos_embed_learned",), (1, buf + n, d), identity),
  ]
  for i in range(c.decoder_depth):
    plan += _block(f"decoder_blocks.{i}", ("decoder_blocks", i), d, c.mlp_ratio)
  plan += _norm("decoder_norm", ("decoder_norm",), d)
  plan.append(Entry("diffusion_pos_embed_learned", ("diffusion_pos_embed_learned",), (1, n, d), identity))
  return plan


def _hint(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
  if any(k.startswith(("blocks.", "word_embed.", "pos_1LC")) for k in unexpected):
    return "the file looks like a VAR / HMAR transformer checkpoint, not a MAR one"
  if misshaped:
    return "the key names are MAR's: does the config's variant (width, depth, img_size, buffer_size) match the file?"
  return ""


def convert_mar_backbone_state_dict(
  state_dict: Mapping[str, np.ndarray], config, *, source_name: str = "state_dict"
) -> mar_model.MARBackbone:
  """Official MAR state_dict (with or without its 'diffloss.*' keys) -> concrete MARBackbone.

  Raises:
    ConversionError naming every missing, unexpected, mis-shaped or non-finite tensor.
  """
  mar_model.check_mar_config(config)
  abstract = nnx.eval_shape(lambda: mar_model.MARBackbone(config, rngs=nnx.Rngs(0)))
  graphdef, target, rest = nnx.split(abstract, nnx.Param, ...)
  sd = {k: np.asarray(v) for k, v in state_dict.items() if not str(k).startswith(DIFFLOSS_PREFIX)}
  state = apply_plan(sd, mar_backbone_entries(config), target, source_name=source_name, hint=_hint)
  return nnx.merge(graphdef, state, rest)


def load_mar_checkpoint(path: str | os.PathLike, *, ema: bool = True) -> dict[str, np.ndarray]:
  """The full official state_dict (backbone and 'diffloss.*') of a MAR checkpoint file.

  ema: take 'model_ema' (the weights the official evaluation samples with) rather than 'model'.
  The file is read with torch.load(weights_only=True), allowing only argparse.Namespace besides
  tensors (the official files store the training arguments under 'args').
  Raises ConversionError naming the file for a missing file, an unreadable one, or one without
  the requested entry.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"MAR checkpoint file {path!r} does not exist")
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is an optional extra
    raise ImportError("converting PyTorch checkpoints needs torch: pip install 'hmar_jax[torch]'") from e
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - the unpickler raises anything on garbage
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(f"{path!r} is not a PyTorch checkpoint torch.load can read ({first[:200]})") from e
  want = "model_ema" if ema else "model"
  if not isinstance(obj, Mapping) or not isinstance(obj.get(want), Mapping):
    keys = sorted(map(str, obj.keys()))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"{path!r} has no {want!r} state_dict (found {keys}); is it an official MAR checkpoint?")
  out = {}
  for k, v in obj[want].items():
    if not isinstance(v, torch.Tensor):
      raise ConversionError(f"{path!r}: {want}[{k!r}] is a {type(v).__name__}, not a tensor")
    t = v.detach().cpu()
    out[str(k)] = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
  return out
