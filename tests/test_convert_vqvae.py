"""The VQVAE converter: full key coverage, and clear errors for anything that does not fit.

Official key names and shapes come from the PyTorch restatement of the official modules in
test_vqvae.py (its tiny instance is converted for real; the full 160-channel one is built on
torch's meta device, so no memory is allocated for its key/shape check).
"""

from __future__ import annotations

import os
import sys

import chex
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flax import nnx  # noqa: E402
from test_vqvae import TorchVQVAE, randomized_torch_vqvae, to_nhwc  # noqa: E402

from configs.vqvae import get_config  # noqa: E402
from hmar_jax.checkpoint import load_metadata  # noqa: E402
from hmar_jax.convert.__main__ import main as convert_main  # noqa: E402
from hmar_jax.convert.common import ConversionError, load_torch_checkpoint  # noqa: E402
from hmar_jax.convert.vqvae import convert_vqvae_state_dict, expected_state_dict_shapes  # noqa: E402
from hmar_jax.tokenizer import load_vqvae  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY_CONFIG = os.path.join(REPO, "configs", "vqvae.py") + ":tiny"


@pytest.fixture(scope="module")
def tiny():
  return get_config("tiny")


@pytest.fixture(scope="module")
def tiny_torch(tiny):
  return randomized_torch_vqvae(tiny, seed=7)


@pytest.fixture()
def tiny_sd(tiny_torch):
  return {k: v.numpy().copy() for k, v in tiny_torch.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory, tiny_torch):
  path = tmp_path_factory.mktemp("src") / "vae_tiny.pth"
  torch.save(tiny_torch.state_dict(), path)
  return str(path)


# ----------------------------------------------------------------------------- coverage


def test_full_official_key_names_and_shapes_are_all_expected():
  c = get_config()
  with torch.device("meta"):
    ref = TorchVQVAE(c)
  official = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert len(official) == 324
  assert expected_state_dict_shapes(c) == official


def test_random_full_size_state_dict_converts_with_every_tensor_used():
  c = get_config()
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s, dtype=np.float32) for k, s in expected_state_dict_shapes(c).items()}
  model = convert_vqvae_state_dict(sd, c)
  state = dict(nnx.to_flat_state(nnx.state(model)))
  n_src = sum(v.size for v in sd.values())
  n_dst = sum(np.size(v.get_value()) for p, v in state.items() if p != ("quantizer", "record_hit"))
  assert n_src == n_dst == 108_948_355 + 10 * 4096  # params + ema_vocab_hit_SV
  # spot checks of the layout conversions, by hand
  w = sd["decoder.up.4.attn.2.qkv.weight"]  # (3C, C, 1, 1) -> (1, 1, C, 3C)
  np.testing.assert_array_equal(
    state[("decoder", "up", 4, "attn", 2, "qkv", "kernel")].get_value(), w.transpose(2, 3, 1, 0)
  )
  w = sd["encoder.down.1.downsample.conv.weight"]
  np.testing.assert_array_equal(
    state[("encoder", "down", 1, "downsample", "conv", "kernel")].get_value()[2, 0], w[:, :, 2, 0].T
  )
  np.testing.assert_array_equal(
    state[("encoder", "mid", "block_2", "norm2", "scale")].get_value(), sd["encoder.mid.block_2.norm2.weight"]
  )
  np.testing.assert_array_equal(
    state[("quantizer", "phis", 3, "conv", "bias")].get_value(), sd["quantize.quant_resi.qresi_ls.3.bias"]
  )
  np.testing.assert_array_equal(
    state[("quantizer", "embedding", "embedding")].get_value(), sd["quantize.embedding.weight"]
  )
  np.testing.assert_array_equal(state[("quantizer", "ema_vocab_hit")].get_value(), sd["quantize.ema_vocab_hit_SV"])


def test_cli_writes_a_checkpoint_that_loads_and_decodes_like_torch(tmp_path, tiny_pth, tiny_torch, tiny):
  dst = tmp_path / "vae"
  assert convert_main(["vqvae", tiny_pth, str(dst), "--config", TINY_CONFIG]) == 0
  vae = load_vqvae(dst)  # architecture from the checkpoint's metadata
  assert load_metadata(dst)["config"]["patch_nums"] == list(tiny.patch_nums)
  g = torch.Generator().manual_seed(0)
  idx = [torch.randint(0, tiny.vocab_size, (1, pn, pn), generator=g) for pn in tiny.patch_nums]
  want = tiny_torch.fhat_to_img(tiny_torch.quantize.indices_to_fhat(idx))
  got = vae.decode_indices([jnp.asarray(i.numpy()) for i in idx])
  chex.assert_trees_all_close(got, to_nhwc(want), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(
    np.asarray(vae.quantizer.ema_vocab_hit[...]), tiny_torch.quantize.ema_vocab_hit_SV.numpy()
  )


def test_destination_is_never_overwritten(tmp_path, tiny_pth):
  dst = tmp_path / "exists"
  dst.mkdir()
  assert convert_main(["vqvae", tiny_pth, str(dst), "--config", TINY_CONFIG]) == 2
  assert list(dst.iterdir()) == []


# ----------------------------------------------------------------------------- corrupted sources


def test_missing_key_is_named(tiny_sd, tiny):
  del tiny_sd["decoder.up.1.attn.0.qkv.weight"]
  with pytest.raises(ConversionError, match=r"missing 1 key\(s\):\s+decoder\.up\.1\.attn\.0\.qkv\.weight"):
    convert_vqvae_state_dict(tiny_sd, tiny)


def test_wrong_shape_is_named(tiny_sd, tiny):
  tiny_sd["encoder.down.0.block.0.conv1.weight"] = np.zeros((32, 32, 5, 5), np.float32)
  with pytest.raises(
    ConversionError,
    match=r"encoder\.down\.0\.block\.0\.conv1\.weight: has shape "
    r"\(32, 32, 5, 5\), expected \(32, 32, 3, 3\)",
  ):
    convert_vqvae_state_dict(tiny_sd, tiny)


def test_extra_key_is_named(tiny_sd, tiny):
  tiny_sd["encoder.down.0.block.0.conv3.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ConversionError, match=r"unexpected 1 key\(s\):\s+encoder\.down\.0\.block\.0\.conv3\.weight"):
    convert_vqvae_state_dict(tiny_sd, tiny)


def test_codebook_size_mismatch_is_named(tiny_sd, tiny):
  tiny_sd["quantize.embedding.weight"] = np.zeros((2 * tiny.vocab_size, tiny.z_channels), np.float32)
  with pytest.raises(
    ConversionError,
    match=r"(?s)quantize\.embedding\.weight: has shape \(128, 8\), "
    r"expected \(64, 8\).*Codebook size mismatch",
  ):
    convert_vqvae_state_dict(tiny_sd, tiny)


def test_a_var_transformer_checkpoint_is_recognised(tmp_path, capsys):
  var_like = {
    "class_emb.weight": torch.zeros(1001, 64),
    "pos_start": torch.zeros(1, 1, 64),
    "word_embed.weight": torch.zeros(64, 32),
    "blocks.0.attn.mat_qkv.weight": torch.zeros(192, 64),
  }
  src = tmp_path / "var_d16.pth"
  torch.save(var_like, src)
  assert convert_main(["vqvae", str(src), str(tmp_path / "out"), "--config", TINY_CONFIG]) == 2
  err = capsys.readouterr().err
  assert "var_d16.pth" in err and "transformer checkpoint" in err
  assert "missing 144 key(s)" in err and "decoder.conv_in.weight" in err and "class_emb.weight" in err
  assert not (tmp_path / "out").exists()


def test_a_non_checkpoint_file_is_rejected_by_name(tmp_path):
  src = tmp_path / "notes.txt"
  src.write_text("this is not a checkpoint\n")
  with pytest.raises(ConversionError, match=r"notes\.txt' is not a PyTorch checkpoint"):
    load_torch_checkpoint(src)
  lst = tmp_path / "list.pth"
  torch.save([torch.zeros(2)], lst)
  with pytest.raises(ConversionError, match=r"list\.pth' holds a list, not a state_dict"):
    load_torch_checkpoint(lst)
  with pytest.raises(ConversionError, match="does not exist"):
    load_torch_checkpoint(tmp_path / "absent.pth")


def test_usage_buffer_of_another_scale_count_is_reset_like_the_official_loader(tiny_sd, tiny):
  tiny_sd["quantize.ema_vocab_hit_SV"] = np.ones((3, tiny.vocab_size), np.float32)
  notes = []
  model = convert_vqvae_state_dict(tiny_sd, tiny, log=notes.append)
  assert np.all(np.asarray(model.quantizer.ema_vocab_hit[...]) == 0) and "reset" in notes[0]


@pytest.mark.parametrize("kind", ["var", "hmar"])
def test_cli_dispatches_transformer_conversions(tmp_path, capsys, kind):
  # wiring only (the transformer converters are tested in test_convert_transformers.py)
  assert convert_main([kind, str(tmp_path / "absent.pth"), str(tmp_path / "out")]) == 2
  assert "absent.pth" in capsys.readouterr().err
