"""The converters refuse tensors that would convert into broken weights: NaN / Inf values, and integer
or bool tensors where float weights go, naming each such tensor (all at once), and write nothing.

State dicts are built under the official key names with random values (as in test_convert_*.py);
only the command-line test needs torch, to write a .pth file.
"""

import os

import numpy as np
import pytest

from hmar_jax.convert.__main__ import main as convert_main
from hmar_jax.convert.common import ConversionError
from hmar_jax.convert.var import convert_var_state_dict, expected_var_shapes
from hmar_jax.convert.vqvae import convert_vqvae_state_dict, expected_state_dict_shapes
from hmar_jax.models import model_config
from hmar_jax.tokenizer.config import vqvae_config
from pallas_kernels import patterns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VQVAE = os.path.join(ROOT, "configs", "vqvae.py") + ":tiny"


def _vqvae_sd(config) -> dict:
  rng = np.random.default_rng(0)
  return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in expected_state_dict_shapes(config).items()}


def _tiny_var():
  m = model_config(2, kind="var", patch_nums=(1, 2), width=64, num_heads=2, vocab_size=16, cvae=8, num_classes=4)
  m.attn_implementation = "xla"
  return m


def _var_sd(m) -> dict:
  """Random weights; the buffers as the official constructor makes them (the attention mask holds -inf)."""
  rng = np.random.default_rng(1)
  sd = {}
  for key, shape in expected_var_shapes(m).items():
    if key.endswith("zero_k_bias"):
      sd[key] = np.zeros(shape, np.float32)
    elif key == "lvl_1L":
      sd[key] = patterns.scale_ids(m.patch_nums)[None].astype(np.int64)
    elif key == "attn_bias_for_masking":
      sd[key] = np.where(patterns.dense_mask(m.patch_nums, m.pattern), 0.0, -np.inf).astype(np.float32)[None, None]
    else:
      sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return sd


def test_a_nan_weight_is_refused_naming_the_tensor():
  config = vqvae_config("tiny")
  sd = _vqvae_sd(config)
  sd["decoder.conv_out.weight"][0, 0, 1, 1] = np.nan
  with pytest.raises(ConversionError, match=r"decoder\.conv_out\.weight: holds 1 non-finite value\(s\) .*1 NaN"):
    convert_vqvae_state_dict(sd, config)


def test_an_infinite_weight_is_refused_naming_the_tensor():
  m = _tiny_var()
  sd = _var_sd(m)
  sd["blocks.1.ffn.fc1.weight"][3, 2] = -np.inf
  with pytest.raises(ConversionError, match=r"blocks\.1\.ffn\.fc1\.weight: holds 1 non-finite value\(s\) .*1 Inf"):
    convert_var_state_dict(sd, m)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_an_integer_tensor_where_float_weights_go_is_refused_naming_the_tensor(dtype):
  m = _tiny_var()
  sd = _var_sd(m)
  sd["blocks.0.attn.proj.bias"] = np.ones(sd["blocks.0.attn.proj.bias"].shape, dtype)
  with pytest.raises(
    ConversionError, match=rf"blocks\.0\.attn\.proj\.bias: has dtype {np.dtype(dtype)}, expected float"
  ):
    convert_var_state_dict(sd, m)


def test_every_unusable_tensor_is_named_at_once():
  m = _tiny_var()
  sd = _var_sd(m)
  sd["head.weight"][0, 0] = np.nan
  sd["pos_start"] = sd["pos_start"].astype(np.int32)
  with pytest.raises(ConversionError, match=r"unusable values in 2 tensor\(s\)") as err:
    convert_var_state_dict(sd, m)
  assert "head.weight: holds" in str(err.value) and "pos_start: has dtype int32" in str(err.value)


def test_the_cli_exits_2_naming_a_nan_tensor_and_writes_nothing(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  sd = _vqvae_sd(vqvae_config("tiny"))
  sd["quantize.embedding.weight"][5] = np.inf
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "vae.pth")
  assert convert_main(["vqvae", str(tmp_path / "vae.pth"), str(tmp_path / "out"), "--config", TINY_VQVAE]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "quantize.embedding.weight: holds" in err
  assert not (tmp_path / "out").exists()
