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
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from hmar_jax.convert.common import Entry, apply_plan, identity
from hmar_jax.convert.diffloss import convert_diffloss_state_dict, diffloss_entries
from hmar_jax.convert.mar import _block, _linear, _norm
from hmar_jax.models import himar as himar_model
from hmar_jax.models import mar as mar_model

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
  abstract = nnx.eval_shape(lambda: himar_model.HiMARBackbone(config, rngs=nnx.Rngs(0)))
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
