"""MAR's KL-16 VAE checkpoint (kl16.ckpt, LDM AutoencoderKL) -> hmar_jax KLVAE.

The NNX module tree mirrors the official one, so the key map is a rename:

  official key                                  NNX path                              transform
  encoder|decoder.<...>.<conv>.weight           encoder|decoder.<...>.<conv>.kernel   (O,I,kh,kw)->(kh,kw,I,O)
  encoder|decoder.<...>.<norm>.weight           ....<norm>.scale                       -
  <any>.bias                                    <any>.bias                             -
  quant_conv.weight / post_quant_conv.weight    quant_conv.kernel / ...                conv

(`...down.{i}.block.{j}`, `encoder.down.{i}.attn.{j}.q|k|v|proj_out`, `down.{i}.downsample.conv`,
`up.{i}.upsample.conv`, `mid.block_1|attn_1|block_2` keep their official names and indices.)

The official file is a dict whose 'model' entry is the state_dict (AutoencoderKL.init_from_ckpt reads
`torch.load(path)['model']`); a bare state_dict is accepted too. Every tensor is used exactly once; a
missing, unexpected or mis-shaped key is named. The one exception: keys under `loss.` (an LDM training
loss -- LPIPS network, discriminator, learned logvar -- that LDM-trained checkpoints may carry and the
official strict=False load ignores) are dropped, and the log says how many.
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
  ConversionError,
  Entry,
  apply_plan,
  conv_kernel,
  conv_source_shape,
  flat_leaves,
  identity,
  path_str,
)
from hmar_jax.tokenizer.kl_vae import KLVAE, kl_vae_config, save_kl_vae, validate_config

TRAINING_LOSS_PREFIX = "loss."
# Key prefixes of other official checkpoints (MAR's transformer and DiffLoss, VAR's VQVAE).
OTHER_MARKERS = ("diffloss.", "encoder_blocks.", "decoder_blocks.", "z_proj.", "class_emb.", "quantize.")


def _source_for(path: tuple, leaf: Any):
  """NNX path -> (official key, transform, expected source shape)."""
  shape = tuple(leaf.shape)
  *mods, name = path
  key = ".".join(str(m) for m in mods)
  if name == "kernel" and len(shape) == 4:
    return f"{key}.weight", conv_kernel, conv_source_shape(shape)
  if name == "scale":
    return f"{key}.weight", identity, shape
  if name == "bias":
    return f"{key}.bias", identity, shape
  raise AssertionError(f"no official key known for {path_str(path)}")


def kl_vae_plan(target: nnx.State) -> list[Entry]:
  """The conversion plan for a KLVAE parameter state (abstract or concrete)."""
  plan = []
  for path, leaf in flat_leaves(target).items():
    key, fn, shape = _source_for(path, leaf)
    plan.append(Entry(key, path, shape, fn))
  return plan


def expected_state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  """{official key: shape} of the official AutoencoderKL built with `config` (no tensors allocated)."""
  validate_config(config)
  abstract = abstract_module(lambda rngs: KLVAE(config, rngs=rngs))
  return {e.source_key: e.source_shape for e in kl_vae_plan(nnx.state(abstract, nnx.Param))}


def _hint(num_expected: int):
  def hint(missing, unexpected, misshaped):
    notes = []
    if len(missing) == num_expected:
      notes.append("None of the official KL VAE keys (encoder.*, decoder.*, quant_conv.*) is present.")
    if any(k.startswith(OTHER_MARKERS) for k in unexpected):
      notes.append("The file looks like another model's checkpoint (a MAR transformer or a VQVAE), not MAR's KL VAE.")
    if len(misshaped) > max(3, num_expected // 10):
      notes.append(
        "Many shapes differ: the checkpoint was made with another architecture (ch, ch_mult, num_res_blocks, "
        "embed_dim) than the config; pass the matching config."
      )
    return " ".join(notes)

  return hint


def unwrap_state_dict(obj: Any, *, source_name: str = "state_dict") -> dict[str, np.ndarray]:
  """The state_dict of an official file: obj['model'] when present (kl16.ckpt), else obj itself.

  Tensors become NumPy arrays (half precision as float32). Raises ConversionError for anything that is
  not a dict of tensors.
  """
  if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{source_name} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
  out, skipped = {}, []
  for k, v in obj.items():
    if hasattr(v, "detach"):  # a torch.Tensor
      t = v.detach().cpu()
      out[str(k)] = (t.float() if t.dtype.is_floating_point and t.element_size() < 4 else t).numpy()
    elif isinstance(v, np.ndarray):
      out[str(k)] = v
    else:
      skipped.append(str(k))
  if skipped:
    raise ConversionError(f"{source_name} has non-tensor entries {skipped[:10]}; expected a state_dict of tensors")
  if not out:
    raise ConversionError(f"{source_name} contains no tensors; is it a KL VAE checkpoint?")
  return out


def load_kl_vae_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads an official KL VAE file ({'model': state_dict, ...} or a bare state_dict) as NumPy arrays.

  torch.load(weights_only=True): no arbitrary code runs. Raises ConversionError naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"KL VAE checkpoint file {path!r} does not exist")
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is an optional extra
    raise ImportError("converting PyTorch checkpoints needs torch: pip install 'hmar_jax[torch]'") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - the unpickler raises anything on garbage
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(
      f"{path!r} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
      f"({type(e).__name__}: {first[:200]})"
    ) from e
  return unwrap_state_dict(obj, source_name=repr(path))


def convert_kl_vae_state_dict(
  state_dict: Mapping[str, Any], config: Any = None, *, source_name: str = "state_dict", log=None
) -> KLVAE:
  """Official AutoencoderKL state_dict -> a concrete KLVAE holding its weights.

  Args:
    state_dict: {official key: array}, or the official file's dict holding it under 'model'.
    config: the architecture (kl_vae_config); default kl_vae_config('kl16'), MAR's kl16.ckpt.
    source_name: the source's name for error messages.
    log: optional fn(str) for notes (e.g. dropped training-loss keys).
  Raises:
    ConversionError naming every missing, unexpected or mis-shaped key.
  """
  config = kl_vae_config("kl16") if config is None else config
  validate_config(config)
  sd = unwrap_state_dict(state_dict, source_name=source_name)
  dropped = [k for k in sd if k.startswith(TRAINING_LOSS_PREFIX)]
  if dropped:
    (log or (lambda s: None))(f"note: dropped {len(dropped)} training-loss tensor(s) under '{TRAINING_LOSS_PREFIX}'")
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAINING_LOSS_PREFIX)}
  abstract = abstract_module(lambda rngs: KLVAE(config, rngs=rngs))
  graphdef, target, rest = nnx.split(abstract, nnx.Param, ...)
  if flat_leaves(rest):
    raise AssertionError(f"KLVAE has non-parameter variables: {list(flat_leaves(rest))}")
  plan = kl_vae_plan(target)
  state = apply_plan(sd, plan, target, source_name=source_name, hint=_hint(len(plan)))
  return nnx.merge(graphdef, state, rest)


def convert_kl_vae_file(src: str | os.PathLike, dst: str | os.PathLike, config: Any = None, *, log=print) -> str:
  """Converts an official KL VAE file (kl16.ckpt) into an hmar_jax checkpoint directory `dst` (must not exist).

  Returns the absolute destination path. Load it with hmar_jax.tokenizer.kl_vae.load_kl_vae(dst).
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst):
    raise FileExistsError(f"destination {dst} already exists; refusing to overwrite it")
  sd = load_kl_vae_state_dict(src)
  model = convert_kl_vae_state_dict(sd, config, source_name=os.path.basename(os.fspath(src)), log=log)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  out = save_kl_vae(
    dst, model, extra_metadata={"converted_from": os.path.abspath(os.fspath(src)), "num_source_tensors": len(sd)}
  )
  log(f"converted {len(sd)} tensors ({n:,} parameters) from {src} -> {out}")
  return out
