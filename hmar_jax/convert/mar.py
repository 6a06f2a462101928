"""Official MAR state_dicts (LTH14/mar checkpoint-last.pth) -> hmar_jax MARBackbone / MARModel.

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

The whole model (hmar_jax/models/mar_model.py MARModel): the keys above go to backbone.<NNX path>,
'diffloss.*' to diffloss.* (hmar_jax/convert/diffloss.py's key map). `convert_mar_file` converts an
official file into a `save_mar` checkpoint, inferring the architecture from the tensor shapes
(`infer_mar_config`) unless a config is given:

  python -m hmar_jax.convert mar checkpoint-last.pth checkpoints/mar_large [--config FILE.py] [--no_ema]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.convert.common import ConversionError, Entry, apply_plan, flat_leaves, identity, linear_kernel
from hmar_jax.convert.diffloss import diffloss_entries
from hmar_jax.models import mar as mar_model
from hmar_jax.models.mar_model import abstract_mar, save_mar

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
  abstract = abstract_module(lambda rngs: mar_model.MARBackbone(config, rngs=rngs))
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


# ----------------------------------------------------------------------------- the whole model

# Keys every official MAR state_dict has; their shapes give the architecture.
_SHAPE_KEYS = ("class_emb.weight", "z_proj.weight", "encoder_pos_embed_learned", "diffusion_pos_embed_learned")
# Keys of other official checkpoints: VAR / HMAR transformers, VQVAE / KL VAE tokenizers.
_OTHER_MARKERS = {
  "pos_1LC": "a VAR / HMAR transformer checkpoint (use `python -m hmar_jax.convert var|hmar`)",
  "word_embed.weight": "a VAR / HMAR transformer checkpoint (use `python -m hmar_jax.convert var|hmar`)",
  "quantize.embedding.weight": "a VQVAE checkpoint (use `python -m hmar_jax.convert vqvae`)",
  "quant_conv.weight": "a VAE tokenizer checkpoint (MAR's KL VAE: use `python -m hmar_jax.convert kl_vae`)",
}
# The official token width: the KL-16 VAE's 16 latent channels times patch_size ** 2.
KL16_EMBED_DIM = 16
KL16_STRIDE = 16


def model_block(config) -> ml_collections.ConfigDict:
  """The MAR model config of a full config (with .model) or of the block itself."""
  return config.model if "model" in config else config


def mar_entries(config) -> list[Entry]:
  """One plan Entry per official MAR key, 'diffloss.*' included, -> MARModel's NNX paths
  (backbone.* as `mar_backbone_entries`, diffloss.* as hmar_jax.convert.diffloss)."""
  backbone = [dataclasses.replace(e, target_path=("backbone",) + e.target_path) for e in mar_backbone_entries(config)]
  head = diffloss_entries(
    DIFFLOSS_PREFIX,
    ("diffloss",),
    depth=int(config.diffloss_d),
    width=int(config.diffloss_w),
    target_channels=mar_model.token_embed_dim(config),
    z_channels=int(config.decoder_embed_dim),
  )
  return backbone + head


def convert_mar_state_dict(
  state_dict: Mapping[str, np.ndarray], config, *, source_name: str = "state_dict"
) -> nnx.State:
  """Official MAR state_dict (backbone and 'diffloss.*') -> the nnx.State (Params) of a MARModel.

  config: the MAR model config (or a full config holding it as .model). Every official tensor is
  used exactly once; apply with nnx.merge(graphdef, state) of `abstract_mar(config)`.
  Raises:
    ConversionError naming every missing, unexpected, mis-shaped or non-finite tensor.
  """
  config = model_block(config)
  mar_model.check_mar_config(config)
  _, target, rest = nnx.split(abstract_mar(config), nnx.Param, ...)
  if flat_leaves(rest):
    raise AssertionError(f"MARModel has non-parameter variables: {list(flat_leaves(rest))}")
  sd = {str(k): np.asarray(v) for k, v in state_dict.items()}
  return apply_plan(sd, mar_entries(config), target, source_name=source_name, hint=_hint)


def _block_count(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
  ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
  return max(ids) + 1 if ids else 0


def _official_heads(width: int, what: str) -> int:
  """Heads of the official variant of this width (mar_base / mar_large / mar_huge)."""
  for v in mar_model.VARIANTS.values():
    if v["width"] == width:
      return v["heads"]
  widths = sorted(v["width"] for v in mar_model.VARIANTS.values())
  raise ConversionError(
    f"the {what} width {width} is none of the official MAR widths {widths}, and the number of attention heads "
    "cannot be read from the tensor shapes: pass the architecture with --config"
  )


def _not_mar(state_dict: Mapping[str, np.ndarray], missing: str) -> ConversionError:
  for key, what in _OTHER_MARKERS.items():
    if key in state_dict:
      return ConversionError(f"this is not a MAR checkpoint: it has no {missing!r} but a {key!r}, like {what}")
  return ConversionError(f"this is not a MAR checkpoint: key {missing!r} is missing (keys: {sorted(state_dict)[:8]})")


def infer_mar_config(state_dict: Mapping[str, np.ndarray]) -> ml_collections.ConfigDict:
  """The MAR model config of an official state_dict, read from its tensor shapes.

  Shapes give the encoder / decoder widths and depths, mlp_ratio, class_num, seq_len (the
  diffusion position embedding), buffer_size (the encoder position embedding's extra length) and
  the diffloss depth / width. The token width is taken as the KL-16 VAE's 16 channels times
  patch_size ** 2 with vae_stride 16 (img_size = sqrt(seq_len) * patch_size * 16); the head counts
  are those of the official variant of the same width. Training-only fields (dropout, label drop,
  mask_ratio_min, diffusion_batch_mul, num_sampling_steps) are mar_config's.
  Raises ConversionError for a file that is not MAR (naming the missing key and, where it can,
  what the file looks like) or whose shapes fit no MAR the config could describe.
  """
  for key in _SHAPE_KEYS:
    if key not in state_dict:
      raise _not_mar(state_dict, key)
  shape = lambda k: tuple(np.shape(state_dict[k]))  # noqa: E731
  classes, e = shape("class_emb.weight")
  e_proj, t = shape("z_proj.weight")
  n = shape("diffusion_pos_embed_learned")[1]
  d = shape("diffusion_pos_embed_learned")[2]
  total = shape("encoder_pos_embed_learned")[1]
  enc_depth = _block_count(state_dict, "encoder_blocks")
  dec_depth = _block_count(state_dict, "decoder_blocks")
  diff_depth = _block_count(state_dict, f"{DIFFLOSS_PREFIX}net.res_blocks")
  if not enc_depth or not dec_depth:
    raise ConversionError("this MAR state_dict has no encoder_blocks.* or no decoder_blocks.*: it is incomplete")
  if not diff_depth or f"{DIFFLOSS_PREFIX}net.input_proj.weight" not in state_dict:
    raise ConversionError("this MAR state_dict has no 'diffloss.net.*' keys (the diffusion head): it is incomplete")
  side = math.isqrt(n)
  patch = math.isqrt(t // KL16_EMBED_DIM) if t % KL16_EMBED_DIM == 0 else 0
  if side * side != n or patch * patch * KL16_EMBED_DIM != t or total <= n or e_proj != e:
    raise ConversionError(
      f"the MAR tensor shapes fit no square token grid of KL-16 tokens (seq_len {n}, token width {t}, "
      f"encoder positions {total}): pass the architecture with --config"
    )
  fc1 = "encoder_blocks.0.mlp.fc1.weight"
  c = mar_model.mar_config("base")
  c.img_size = side * patch * KL16_STRIDE
  c.vae_stride = KL16_STRIDE
  c.patch_size = patch
  c.vae_embed_dim = KL16_EMBED_DIM
  c.encoder_embed_dim, c.encoder_depth, c.encoder_num_heads = e, enc_depth, _official_heads(e, "encoder")
  c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads = d, dec_depth, _official_heads(d, "decoder")
  c.mlp_ratio = float(shape(fc1)[0] / e) if fc1 in state_dict else 4.0
  c.class_num = classes
  c.buffer_size = total - n
  c.diffloss_d = diff_depth
  c.diffloss_w = shape(f"{DIFFLOSS_PREFIX}net.input_proj.weight")[0]
  return c


def infer_mar_variant(state_dict: Mapping[str, np.ndarray]) -> str | None:
  """'base' / 'large' / 'huge': the official variant whose architecture (mar_config) the state_dict's
  shapes have, or None for another size. Raises ConversionError as `infer_mar_config`."""
  c = infer_mar_config(state_dict)
  for name in mar_model.VARIANTS:
    if mar_model.mar_config(name).to_dict() == c.to_dict():
      return name
  return None


def convert_mar_file(
  src: str | os.PathLike, dst: str | os.PathLike, config=None, *, ema: bool = True, log=print
) -> str:
  """Converts an official MAR checkpoint-last.pth into a `save_mar` checkpoint `dst` (must not exist).

  ema: convert 'model_ema' (the weights the official evaluation samples with); False: 'model'.
  config: the MAR model config (or a full config holding it as .model); None infers it from the
  shapes (`infer_mar_config`). Nothing is written unless every tensor converts. Returns dst.
  Load it with hmar_jax.models.mar_model.load_mar(dst).
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst):
    raise FileExistsError(f"destination {dst} already exists; refusing to overwrite it")
  which = "model_ema" if ema else "model"
  sd = load_mar_checkpoint(src, ema=ema)
  name = f"{os.path.basename(os.fspath(src))}[{which!r}]"
  try:
    config = infer_mar_config(sd) if config is None else ml_collections.ConfigDict(model_block(config).to_dict())
  except ConversionError as e:
    raise ConversionError(f"{name}: {e}") from None
  state = convert_mar_state_dict(sd, config, source_name=name)
  graphdef, _ = nnx.split(abstract_mar(config), nnx.Param)
  model = nnx.merge(graphdef, state)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  out = save_mar(
    dst,
    model,
    config,
    extra_metadata={"converted_from": os.path.abspath(os.fspath(src)), "weights": which, "num_source_tensors": len(sd)},
  )
  log(f"converted {len(sd)} tensors ({n:,} parameters) of {which!r} from {src} -> {out}")
  return out
