"""Official Hi-MAR state_dicts (HiDream-ai/himar checkpoint-last.pth) -> hmar_jax HiMARBackbone.

The official file is a dict {'model': state_dict, 'model_ema': state_dict, ...} like MAR's (read it with
hmar_jax/convert/mar.py `load_mar_checkpoint`). Its keys: the transformer's (below), the stage-1 MLP
head 'diffloss.*' (MAR's DiffLoss: `himar_diffloss_entries`, hmar_jax/convert/diffloss.py's key map)
and the stage-2 global head 'cond_diffloss.*' (not converted here). Key map (E = D width, T token
width, S = cond_scale ** 2, N = S + L, buf buffer_size; torch Linear weight (O, I) -> kernel (I, O)):

  official key                                  shape                  NNX path                     transform
  class_emb.weight                              (class_num, E)         class_emb.embedding          -
  fake_latent                                   (1, E)                 fake_latent                  -
  z_proj.weight / .bias                         (E, T) / (E,)          z_proj.kernel / .bias        .T / -
  z_proj_ln.weight / .bias                      (E,)                   z_proj_ln.scale / .bias      -
  cond_z_proj.weight / .bias                    (E, D) / (E,)          cond_z_proj.*                .T / -
  cond_tokens                                   (1, S, cond_dim)       cond_tokens                  -
  cond_proj.weight / .bias                      (E, cond_dim) / (E,)   cond_proj.*                  .T / -
  mask_token                                    (1, 2N, E)             mask_token                   -
  encoder_pos_embed_learned                     (1, 2(buf + N), E)     same name                    -
  encoder_blocks.{i}.norm1|norm2.weight / .bias (E,)                   ...norm1|norm2.scale / .bias -
  encoder_blocks.{i}.attn.qkv|proj.*, mlp.fc1|fc2.*                    as MAR's blocks              .T / -
  encoder_blocks.{i}.adaLN_scale|adaLN_shift    (2, 1, 1, 4E)          same name                    -
  encoder_task_emb.weight                       (2, E)                 encoder_task_emb.embedding   -
  encoder_blocks_ada.1.weight / .bias           (4E, E) / (4E,)        encoder_blocks_ada.kernel / .bias  .T / -
  encoder_norm.weight / .bias                   (E,)                   encoder_norm.scale / .bias   -
  decoder_embed.weight / .bias                  (D, E) / (D,)          decoder_embed.*              .T / -
  decoder_pos_embed_learned                     (1, 2(buf + N), D)     same name                    -
  decoder_blocks.{i}.*, decoder_task_emb.weight, decoder_blocks_ada.1.*, decoder_norm.*  as the encoder's
  diffusion_pos_embed_learned                   (1, N, D)              same name                    -

The whole model (hmar_jax/models/himar_model.py HiMARModel): the keys above go to backbone.<NNX path>,
'diffloss.*' to diffloss.* (hmar_jax/convert/diffloss.py's key map), 'cond_diffloss.*' to
cond_diffloss.* (hmar_jax/convert/dit_head.py's key map; its two buffers net.pos_embed / net.c_pos_embed
are checked, not stored). `convert_himar_file` converts an official file into a `save_himar`
checkpoint, inferring the architecture from the tensor shapes (`infer_himar_config`) unless a config
is given:

  python -m hmar_jax.convert himar checkpoint-last.pth checkpoints/himar_large [--config FILE.py] [--no_ema]
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.convert.common import ConversionError, Entry, apply_plan, flat_leaves, identity
from hmar_jax.convert.diffloss import convert_diffloss_state_dict, diffloss_entries
from hmar_jax.convert.dit_head import check_dit_head_buffers, dit_head_entries
from hmar_jax.convert.mar import (
  _OTHER_MARKERS,
  KL16_EMBED_DIM,
  KL16_STRIDE,
  _block,
  _block_count,
  _linear,
  _norm,
  load_mar_checkpoint,
)
from hmar_jax.models import himar as himar_model
from hmar_jax.models import mar as mar_model
from hmar_jax.models.himar_model import abstract_himar, check_himar_model_config, himar_model_config, save_himar

DIFFLOSS_PREFIX = "diffloss."  # the stage-1 MLP head (MAR's DiffLoss)
GLOBAL_HEAD_PREFIX = "cond_diffloss."  # the stage-2 global diffusion transformer
HEAD_PREFIXES = (DIFFLOSS_PREFIX, GLOBAL_HEAD_PREFIX)


def _hi_block(src: str, dst: tuple, dim: int, mlp_ratio: float) -> list[Entry]:
  shape = (himar_model.NUM_TASKS, 1, 1, 4 * dim)
  return _block(src, dst, dim, mlp_ratio) + [
    Entry(f"{src}.adaLN_scale", dst + ("adaLN_scale",), shape, identity),
    Entry(f"{src}.adaLN_shift", dst + ("adaLN_shift",), shape, identity),
  ]


def _stack(name: str, depth: int, dim: int, config) -> list[Entry]:
  plan = []
  for i in range(depth):
    plan += _hi_block(f"{name}_blocks.{i}", (f"{name}_blocks", i), dim, config.mlp_ratio)
  plan.append(
    Entry(f"{name}_task_emb.weight", (f"{name}_task_emb", "embedding"), (himar_model.NUM_TASKS, dim), identity)
  )
  plan += _linear(f"{name}_blocks_ada.1", (f"{name}_blocks_ada",), 4 * dim, dim)
  plan += _norm(f"{name}_norm", (f"{name}_norm",), dim)
  return plan


def himar_backbone_entries(config) -> list[Entry]:
  """One plan Entry per official Hi-MAR key except the heads' (see the module docstring)."""
  c = config
  e, d = c.encoder_embed_dim, c.decoder_embed_dim
  s = himar_model.low_res_len(c)
  n = s + himar_model.high_res_len(c)
  buf = c.buffer_size
  plan = [
    Entry("class_emb.weight", ("class_emb", "embedding"), (c.class_num, e), identity),
    Entry("fake_latent", ("fake_latent",), (1, e), identity),
    *_linear("z_proj", ("z_proj",), e, mar_model.token_embed_dim(c)),
    *_norm("z_proj_ln", ("z_proj_ln",), e),
    *_linear("cond_z_proj", ("cond_z_proj",), e, d),
    Entry("cond_tokens", ("cond_tokens",), (1, s, c.cond_dim), identity),
    *_linear("cond_proj", ("cond_proj",), e, c.cond_dim),
    Entry("mask_token", ("mask_token",), (1, 2 * n, e), identity),
    Entry("encoder_pos_embed_learned", ("encoder_pos_embed_learned",), (1, 2 * (buf + n), e), identity),
  ]
  plan += _stack("encoder", c.encoder_depth, e, c)
  plan += _linear("decoder_embed", ("decoder_embed",), d, e)
  plan.append(Entry("decoder_pos_embed_learned", ("decoder_pos_embed_learned",), (1, 2 * (buf + n), d), identity))
  plan += _stack("decoder", c.decoder_depth, d, c)
  plan.append(Entry("diffusion_pos_embed_learned", ("diffusion_pos_embed_learned",), (1, n, d), identity))
  return plan


def himar_diffloss_entries(config, dst_prefix: tuple = ("diffloss",)) -> list[Entry]:
  """Plan entries of the stage-1 head 'diffloss.*' (MAR's DiffLoss: target = token width, z = D)."""
  return diffloss_entries(
    DIFFLOSS_PREFIX,
    dst_prefix,
    depth=int(config.diffloss_d),
    width=int(config.diffloss_w),
    target_channels=mar_model.token_embed_dim(config),
    z_channels=int(config.decoder_embed_dim),
  )


def _hint(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
  if any(k in ("encoder_task_emb.weight", "cond_proj.weight") for k in missing) and not any(
    k.startswith(("encoder_task_emb.", "cond_")) for k in unexpected
  ):
    return "the file has no task embeddings / pivot projections: it looks like a MAR checkpoint, not a Hi-MAR one"
  if misshaped:
    return "the key names are Hi-MAR's: do the config's width, depth, img_size, cond_scale and buffer_size match?"
  return ""


def convert_himar_backbone_state_dict(
  state_dict: Mapping[str, np.ndarray], config, *, source_name: str = "state_dict"
) -> himar_model.HiMARBackbone:
  """Official Hi-MAR state_dict (with or without its 'diffloss.*' / 'cond_diffloss.*' head keys) ->
  concrete HiMARBackbone.

  Raises:
    ConversionError naming every missing, unexpected, mis-shaped or non-finite tensor.
  """
  himar_model.check_himar_config(config)
  abstract = abstract_module(lambda rngs: himar_model.HiMARBackbone(config, rngs=rngs))
  graphdef, target, rest = nnx.split(abstract, nnx.Param, ...)
  sd = {str(k): np.asarray(v) for k, v in state_dict.items() if not str(k).startswith(HEAD_PREFIXES)}
  state = apply_plan(sd, himar_backbone_entries(config), target, source_name=source_name, hint=_hint)
  return nnx.merge(graphdef, state, rest)


def convert_himar_diffloss_state_dict(
  state_dict: Mapping[str, np.ndarray], config, *, source_name: str = "state_dict"
) -> nnx.State:
  """The stage-1 head's 'diffloss.*' keys of an official Hi-MAR state_dict -> the nnx.State of a DiffLoss
  (target_channels token width, z_channels D, diffloss_d x diffloss_w); other keys are ignored."""
  himar_model.check_himar_config(config)
  sd = {str(k): np.asarray(v) for k, v in state_dict.items() if str(k).startswith(DIFFLOSS_PREFIX)}
  return convert_diffloss_state_dict(sd, config, src_prefix=DIFFLOSS_PREFIX, source_name=source_name)


# ----------------------------------------------------------------------------- the whole model

# Keys every official Hi-MAR state_dict has; their shapes give the architecture.
_SHAPE_KEYS = (
  "class_emb.weight",
  "z_proj.weight",
  "cond_tokens",
  "mask_token",
  "encoder_pos_embed_learned",
  "diffusion_pos_embed_learned",
)


def model_block(config) -> ml_collections.ConfigDict:
  """The Hi-MAR model config of a full config (with .model) or of the block itself."""
  return config.model if "model" in config else config


def himar_entries(config) -> list[Entry]:
  """One plan Entry per official Hi-MAR parameter key (the DiT head's two buffers excepted: see
  `convert_himar_state_dict`) -> HiMARModel's NNX paths: backbone.*, diffloss.*, cond_diffloss.*."""
  c = himar_model_config(config)
  backbone = [dataclasses.replace(e, target_path=("backbone",) + e.target_path) for e in himar_backbone_entries(c)]
  head2 = dit_head_entries(
    GLOBAL_HEAD_PREFIX,
    ("cond_diffloss",),
    depth=int(c.gdm_d),
    width=int(c.gdm_w),
    target_channels=mar_model.token_embed_dim(c),
    z_channels=int(c.decoder_embed_dim),
    mlp_ratio=float(c.ratio),
  )
  return backbone + himar_diffloss_entries(c, ("diffloss",)) + head2


def convert_himar_state_dict(
  state_dict: Mapping[str, np.ndarray], config, *, source_name: str = "state_dict"
) -> nnx.State:
  """Official Hi-MAR state_dict (backbone, 'diffloss.*', 'cond_diffloss.*') -> the nnx.State (Params)
  of a HiMARModel.

  config: the Hi-MAR model config (or a full config holding it as .model). Every official tensor is
  used exactly once; the DiT head's buffers are checked (`check_dit_head_buffers`). Apply with
  nnx.merge(graphdef, state) of `abstract_himar(config)`.
  Raises:
    ConversionError naming every missing, unexpected, mis-shaped or non-finite tensor and bad buffer.
  """
  c = himar_model_config(model_block(config))
  check_himar_model_config(c)
  _, target, rest = nnx.split(abstract_himar(c), nnx.Param, ...)
  if flat_leaves(rest):
    raise AssertionError(f"HiMARModel has non-parameter variables: {list(flat_leaves(rest))}")
  sd = {str(k): np.asarray(v) for k, v in state_dict.items()}
  buffer_problems = check_dit_head_buffers(sd, GLOBAL_HEAD_PREFIX, width=int(c.gdm_w), grid_size=mar_model.seq_hw(c)[0])
  try:
    state = apply_plan(sd, himar_entries(c), target, source_name=source_name, hint=_hint)
  except ConversionError as e:
    if buffer_problems:
      raise ConversionError(f"{e}\nbuffer problems:\n  " + "\n  ".join(buffer_problems)) from None
    raise
  if buffer_problems:
    raise ConversionError(f"{source_name}: buffer problems:\n  " + "\n  ".join(buffer_problems))
  return state


def _not_himar(state_dict: Mapping[str, np.ndarray], missing: str) -> ConversionError:
  if "mask_token" in state_dict and "encoder_pos_embed_learned" in state_dict and "cond_tokens" not in state_dict:
    return ConversionError(
      f"this is not a Hi-MAR checkpoint: it has no {missing!r} (no pivot tokens) but MAR's keys, like a MAR "
      "checkpoint (use `python -m hmar_jax.convert mar`)"
    )
  for key, what in _OTHER_MARKERS.items():
    if key in state_dict:
      return ConversionError(f"this is not a Hi-MAR checkpoint: it has no {missing!r} but a {key!r}, like {what}")
  return ConversionError(
    f"this is not a Hi-MAR checkpoint: key {missing!r} is missing (keys: {sorted(state_dict)[:8]})"
  )


def _official(field: str, value: int, out: str, what: str) -> int:
  """`out` (heads) of the official Hi-MAR variant whose `field` (a width) equals value."""
  found = {v[out] for v in himar_model.VARIANTS.values() if v[field] == value}
  if len(found) == 1:
    return found.pop()
  widths = sorted({v[field] for v in himar_model.VARIANTS.values()})
  raise ConversionError(
    f"the {what} width {value} is none of the official Hi-MAR widths {widths}, and the number of attention "
    "heads cannot be read from the tensor shapes: pass the architecture with --config"
  )


def infer_himar_config(state_dict: Mapping[str, np.ndarray]) -> ml_collections.ConfigDict:
  """The Hi-MAR model config of an official state_dict, read from its tensor shapes.

  Shapes give the width and depths, mlp_ratio, class_num, cond_scale and cond_dim (cond_tokens),
  the high-res token count L (diffusion_pos_embed_learned: S + L positions; img_size = sqrt(L) *
  patch_size * 16), buffer_size (the encoder position table: 2 (buf + S + L)), the MLP head's
  diffloss_d / diffloss_w and the DiT head's gdm_d / gdm_w / ratio. The token width is the KL-16 VAE's
  16 channels times patch_size ** 2; the backbone heads are those of the official variant of the same
  width, the DiT head's those of the official variant of the same gdm_w. Training-only fields are
  himar_config's, with `himar_model_config`'s defaults.
  Raises ConversionError for a file that is not Hi-MAR (naming the missing key and, where it can,
  what the file looks like) or whose shapes fit no Hi-MAR the config could describe.
  """
  for key in _SHAPE_KEYS:
    if key not in state_dict:
      raise _not_himar(state_dict, key)
  shape = lambda k: tuple(np.shape(state_dict[k]))  # noqa: E731
  classes, e = shape("class_emb.weight")
  e_proj, t = shape("z_proj.weight")
  _, s, cond_dim = shape("cond_tokens")
  _, n, d = shape("diffusion_pos_embed_learned")
  mask_len = shape("mask_token")[1]
  total = shape("encoder_pos_embed_learned")[1]
  enc_depth = _block_count(state_dict, "encoder_blocks")
  dec_depth = _block_count(state_dict, "decoder_blocks")
  if not enc_depth or not dec_depth:
    raise ConversionError("this Hi-MAR state_dict has no encoder_blocks.* or no decoder_blocks.*: it is incomplete")
  diff_depth = _block_count(state_dict, f"{DIFFLOSS_PREFIX}net.res_blocks")
  if not diff_depth or f"{DIFFLOSS_PREFIX}net.input_proj.weight" not in state_dict:
    raise ConversionError("this Hi-MAR state_dict has no 'diffloss.net.*' keys (the stage-1 head): it is incomplete")
  gdm_depth = _block_count(state_dict, f"{GLOBAL_HEAD_PREFIX}net.blocks")
  x_embed = f"{GLOBAL_HEAD_PREFIX}net.x_embedder.proj.weight"
  fc1 = f"{GLOBAL_HEAD_PREFIX}net.blocks.0.mlp.fc1.weight"
  if not gdm_depth or x_embed not in state_dict or fc1 not in state_dict:
    raise ConversionError(
      "this Hi-MAR state_dict has no 'cond_diffloss.net.*' keys (the stage-2 global head): it is incomplete"
    )
  high = n - s
  side, scale = math.isqrt(max(high, 0)), math.isqrt(s)
  patch = math.isqrt(t // KL16_EMBED_DIM) if t % KL16_EMBED_DIM == 0 else 0
  if (
    high < 1
    or side * side != high
    or scale * scale != s
    or patch * patch * KL16_EMBED_DIM != t
    or mask_len != 2 * n
    or total % 2
    or total // 2 <= n
    or e_proj != e
  ):
    raise ConversionError(
      f"the Hi-MAR tensor shapes fit no square grids of KL-16 tokens (S + L = {n} positions with S = {s} pivots, "
      f"token width {t}, {mask_len} mask tokens, {total} encoder positions): pass the architecture with --config"
    )
  gdm_w = shape(x_embed)[0]
  c = himar_model.himar_config("large")
  c.img_size = side * patch * KL16_STRIDE
  c.vae_stride = KL16_STRIDE
  c.patch_size = patch
  c.vae_embed_dim = KL16_EMBED_DIM
  c.encoder_embed_dim, c.encoder_depth = e, enc_depth
  c.decoder_embed_dim, c.decoder_depth = d, dec_depth
  c.encoder_num_heads = _official("width", e, "heads", "encoder")
  c.decoder_num_heads = _official("width", d, "heads", "decoder")
  block_fc1 = "encoder_blocks.0.mlp.fc1.weight"
  c.mlp_ratio = float(shape(block_fc1)[0] / e) if block_fc1 in state_dict else 4.0
  c.class_num = classes
  c.buffer_size = total // 2 - n
  c.cond_scale, c.cond_dim = scale, cond_dim
  c.diffloss_d = diff_depth
  c.diffloss_w = shape(f"{DIFFLOSS_PREFIX}net.input_proj.weight")[0]
  c.gdm_d, c.gdm_w = gdm_depth, gdm_w
  c.head = _official("gdm_w", gdm_w, "head", "global head")
  fields = c.to_dict()
  ratio = shape(fc1)[0] / gdm_w  # official --ratio is an int; keep a fractional one exact
  fields["ratio"] = int(ratio) if float(ratio).is_integer() else ratio
  return himar_model_config(fields)


def infer_himar_variant(state_dict: Mapping[str, np.ndarray]) -> str | None:
  """'base' / 'large' / 'huge': the official variant whose architecture the state_dict's shapes have,
  or None for another size. Raises ConversionError as `infer_himar_config`."""
  got = infer_himar_config(state_dict).to_dict()
  for name in himar_model.VARIANTS:
    if himar_model_config(himar_model.himar_config(name)).to_dict() == got:
      return name
  return None


def convert_himar_file(
  src: str | os.PathLike, dst: str | os.PathLike, config=None, *, ema: bool = True, log=print
) -> str:
  """Converts an official Hi-MAR checkpoint-last.pth into a `save_himar` checkpoint `dst` (must not exist).

  ema: convert 'model_ema' (the weights the official evaluation samples with); False: 'model'.
  config: the Hi-MAR model config (or a full config holding it as .model); None infers it from the
  shapes (`infer_himar_config`). Nothing is written unless every tensor converts. Returns dst.
  Load it with hmar_jax.models.himar_model.load_himar(dst).
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst):
    raise FileExistsError(f"destination {dst} already exists; refusing to overwrite it")
  if not os.path.isfile(src):
    raise ConversionError(f"Hi-MAR checkpoint file {os.fspath(src)!r} does not exist")
  which = "model_ema" if ema else "model"
  sd = load_mar_checkpoint(src, ema=ema)  # the official file layout is MAR's
  name = f"{os.path.basename(os.fspath(src))}[{which!r}]"
  try:
    config = infer_himar_config(sd) if config is None else himar_model_config(model_block(config))
  except ConversionError as e:
    raise ConversionError(f"{name}: {e}") from None
  state = convert_himar_state_dict(sd, config, source_name=name)
  graphdef, _ = nnx.split(abstract_himar(config), nnx.Param)
  model = nnx.merge(graphdef, state)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  out = save_himar(
    dst,
    model,
    config,
    extra_metadata={"converted_from": os.path.abspath(os.fspath(src)), "weights": which, "num_source_tensors": len(sd)},
  )
  log(f"converted {len(sd)} tensors ({n:,} parameters) of {which!r} from {src} -> {out}")
  return out
