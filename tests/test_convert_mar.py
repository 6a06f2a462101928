"""Converting whole official MAR checkpoints (backbone + diffusion head) and MAR's KL VAE file.

A fake official checkpoint-last.pth for the 'tiny' MAR is written the way the official util/misc.py
save_model does: {'model': state_dict, 'model_ema': state_dict, 'args': argparse.Namespace}, from the
PyTorch re-statements tests/torch_ref_mar.py (backbone) and tests/torch_ref_diffloss.py (head, its
keys under 'diffloss.'). The converted file, loaded with load_mar, is compared with them: z of the
backbone against the float64 re-statement (atol / rtol 2e-4, as tests/test_mar_backbone.py), the
head's network output against the float64 torch network (atol / rtol 1e-5 on outputs of order 1).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref_diffloss import randomized_torch_diffloss  # noqa: E402
from torch_ref_kl_vae import randomized  # noqa: E402
from torch_ref_mar import RefMAR  # noqa: E402

from hmar_jax.convert.__main__ import main as convert_main  # noqa: E402
from hmar_jax.convert.common import ConversionError  # noqa: E402
from hmar_jax.convert.mar import (  # noqa: E402
  convert_mar_state_dict,
  infer_mar_config,
  infer_mar_variant,
  mar_entries,
)
from hmar_jax.convert.var import expected_var_shapes  # noqa: E402
from hmar_jax.models import mar, model_config  # noqa: E402
from hmar_jax.models.mar_model import abstract_mar, load_mar  # noqa: E402
from hmar_jax.tokenizer.kl_vae import kl_vae_config, load_kl_vae, validate_config  # noqa: E402

Z_TOL = dict(atol=2e-4, rtol=2e-4)
NET_TOL = dict(atol=1e-5, rtol=1e-5)
B = 2

TINY_CONFIG_FILE = """
from hmar_jax.models.mar import mar_config


def get_config():
  return mar_config("tiny")
"""


def tiny():
  return mar.mar_config("tiny")


def torch_mar(config, seed):
  """(RefMAR, TorchDiffLoss), float64, random weights: the official model's two halves."""
  backbone = RefMAR(config).randomize(seed).double().eval()
  head = randomized_torch_diffloss(
    mar.token_embed_dim(config), config.decoder_embed_dim, config.diffloss_d, config.diffloss_w, seed=seed
  )
  return backbone, head.double().eval()


def official_state_dict(backbone, head) -> dict:
  """The official MAR state_dict (float32 tensors): backbone keys, then 'diffloss.net.*'."""
  sd = {k: v.float() for k, v in backbone.state_dict().items()}
  sd.update({f"diffloss.{k}": v.float() for k, v in head.state_dict().items()})
  return sd


def write_official_file(path, sd_model, sd_ema):
  args = argparse.Namespace(model="mar_tiny", diffloss_d=2, diffloss_w=64, buffer_size=4, ema_rate=0.9999)
  torch.save({"model": sd_model, "model_ema": sd_ema, "args": args, "epoch": 3}, path)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """The file, its tiny config file, and the torch modules of 'model' (seed 1) and 'model_ema' (seed 2)."""
  root = tmp_path_factory.mktemp("official")
  raw, ema = torch_mar(tiny(), 1), torch_mar(tiny(), 2)
  write_official_file(root / "checkpoint-last.pth", official_state_dict(*raw), official_state_dict(*ema))
  (root / "mar_tiny.py").write_text(TINY_CONFIG_FILE)
  return {"src": root / "checkpoint-last.pth", "config": str(root / "mar_tiny.py"), "model": raw, "model_ema": ema}


@pytest.fixture(scope="module")
def converted_ema(official, tmp_path_factory):
  dst = tmp_path_factory.mktemp("converted") / "mar"
  assert convert_main(["mar", str(official["src"]), str(dst), "--config", official["config"]]) == 0
  return load_mar(dst)


def z_of(model, ref, seed):
  """(JAX z, torch z) of the backbone for one random batch with 12 of 16 tokens masked per row."""
  c = tiny()
  n, t = mar.seq_len(c), mar.token_embed_dim(c)
  rng = np.random.default_rng(seed)
  tokens = rng.standard_normal((B, n, t)).astype(np.float32)
  labels = rng.integers(0, c.class_num, B)
  mask = np.zeros((B, n), np.float32)
  for r in range(B):
    mask[r, rng.permutation(n)[:12]] = 1.0
  got = model.backbone(tokens, mask, labels, capacity=c.buffer_size + n)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens).double(), torch.from_numpy(mask).double(), torch.from_numpy(labels).long())
  return np.asarray(got), want.numpy()


def net_of(model, head, seed):
  """(JAX, torch) diffusion-network outputs (N, 2C) on random x_t, timesteps and conditions."""
  c = tiny()
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((8, mar.token_embed_dim(c))).astype(np.float32)
  t = rng.integers(0, 1000, 8)
  z = rng.standard_normal((8, c.decoder_embed_dim)).astype(np.float32)
  got = model.diffloss.net(x, t, z)
  with torch.no_grad():
    want = head.net(torch.from_numpy(x).double(), torch.from_numpy(t), torch.from_numpy(z).double())
  return np.asarray(got), want.numpy()


# ----------------------------------------------------------------------------- the whole model


def test_the_plan_expects_every_official_key_once_with_its_shape():
  backbone, head = torch_mar(tiny(), 0)
  want = {k: tuple(v.shape) for k, v in official_state_dict(backbone, head).items()}
  plan = mar_entries(tiny())
  assert len(plan) == len(want)
  assert {e.source_key: tuple(e.source_shape) for e in plan} == want


def test_the_cli_converts_the_ema_weights_and_the_backbone_matches_the_restatement(official, converted_ema):
  got, want = z_of(converted_ema, official["model_ema"][0], seed=0)
  np.testing.assert_allclose(got, want, **Z_TOL)


def test_the_converted_diffusion_head_matches_the_restatement(official, converted_ema):
  got, want = net_of(converted_ema, official["model_ema"][1], seed=1)
  np.testing.assert_allclose(got, want, **NET_TOL)


def test_no_ema_converts_the_raw_weights(official, tmp_path):
  dst = tmp_path / "raw"
  assert convert_main(["mar", str(official["src"]), str(dst), "--config", official["config"], "--no_ema"]) == 0
  model = load_mar(dst)
  raw_backbone, raw_head = official["model"]
  got, want = z_of(model, raw_backbone, seed=2)
  np.testing.assert_allclose(got, want, **Z_TOL)
  got, want = net_of(model, raw_head, seed=3)
  np.testing.assert_allclose(got, want, **NET_TOL)


def _edited_file(official, tmp_path, edit):
  sd = official_state_dict(*official["model_ema"])
  edit(sd)
  src = tmp_path / "edited.pth"
  write_official_file(src, sd, sd)
  return src


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda sd: sd.pop("diffloss.net.res_blocks.1.adaLN_modulation.1.bias"), "missing 1 key"),
    (lambda sd: sd.__setitem__("diffloss.net.extra.weight", torch.zeros(3)), "unexpected 1 key"),
  ],
  ids=["missing", "unexpected"],
)
def test_a_checkpoint_with_a_missing_or_extra_diffloss_key_is_refused_naming_it_and_nothing_is_written(
  official, tmp_path, capsys, edit, message
):
  src = _edited_file(official, tmp_path, edit)
  dst = tmp_path / "out"
  assert convert_main(["mar", str(src), str(dst), "--config", official["config"]]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err
  assert "diffloss.net.res_blocks.1.adaLN_modulation.1.bias" in err or "diffloss.net.extra.weight" in err
  assert not dst.exists()


def test_an_existing_destination_is_refused_before_reading_the_source(tmp_path, capsys):
  dst = tmp_path / "exists"
  dst.mkdir()
  assert convert_main(["mar", str(tmp_path / "no_such.pth"), str(dst)]) == 2
  assert "already exists" in capsys.readouterr().err


def test_a_file_without_the_requested_weights_is_refused_naming_the_entry(tmp_path, capsys):
  src = tmp_path / "raw_only.pth"
  torch.save({"model": {"fake_latent": torch.zeros(1, 64)}}, src)
  assert convert_main(["mar", str(src), str(tmp_path / "out")]) == 2
  assert "no 'model_ema' state_dict" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- architecture from shapes


def shapes_only(config) -> dict:
  """{official key: zero-stride array of the right shape} (no memory for the big variants)."""
  return {e.source_key: np.broadcast_to(np.float32(0), e.source_shape) for e in mar_entries(config)}


@pytest.mark.parametrize("variant", ["base", "large", "huge"])
def test_the_official_variants_are_recognised_from_their_shapes(variant):
  sd = shapes_only(mar.mar_config(variant))
  assert infer_mar_variant(sd) == variant
  assert infer_mar_config(sd).to_dict() == mar.mar_config(variant).to_dict()


def test_the_shapes_give_image_size_buffer_classes_and_diffloss_size_of_a_custom_model():
  c = mar.mar_config("large")
  c.update(img_size=512, buffer_size=32, class_num=17, diffloss_d=3, diffloss_w=96, patch_size=2)
  got = infer_mar_config(shapes_only(c))
  assert got.to_dict() == c.to_dict()
  assert infer_mar_variant(shapes_only(c)) is None


def test_a_width_of_no_official_variant_needs_a_config(official, tmp_path, capsys):
  assert convert_main(["mar", str(official["src"]), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "width 64 is none of the official MAR widths" in err and "--config" in err
  assert not (tmp_path / "out").exists()


def test_a_var_state_dict_is_refused_as_not_mar():
  m = model_config(2, kind="var", patch_nums=(1, 2), width=64, num_heads=2, vocab_size=16, cvae=8, num_classes=4)
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in expected_var_shapes(m).items()}
  with pytest.raises(ConversionError, match=r"not a MAR checkpoint.*'pos_1LC'.*VAR / HMAR"):
    infer_mar_config(sd)


def test_a_state_dict_without_the_diffusion_head_is_refused_by_the_inference():
  sd = {k: v for k, v in shapes_only(mar.mar_config("base")).items() if not k.startswith("diffloss.")}
  with pytest.raises(ConversionError, match="no 'diffloss.net.\\*' keys"):
    infer_mar_config(sd)


def test_a_misshaped_tensor_is_named_with_a_hint_about_the_variant():
  c = tiny()
  sd = {k: np.zeros(np.shape(v), np.float32) for k, v in shapes_only(c).items()}
  sd["diffusion_pos_embed_learned"] = np.zeros((1, 9, 64), np.float32)
  with pytest.raises(ConversionError, match=r"(?s)diffusion_pos_embed_learned: has shape \(1, 9, 64\).*variant"):
    convert_mar_state_dict(sd, c)


def test_the_converted_state_fills_every_parameter_of_the_model():
  c = tiny()
  rng = np.random.default_rng(0)
  sd = {e.source_key: rng.standard_normal(e.source_shape).astype(np.float32) for e in mar_entries(c)}
  state = convert_mar_state_dict(sd, c)
  want = nnx.state(abstract_mar(c), nnx.Param)
  got_paths = {tuple(p) for p, _ in nnx.to_flat_state(state)}
  assert got_paths == {tuple(p) for p, _ in nnx.to_flat_state(want)}
  flat = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
  np.testing.assert_array_equal(
    flat[("diffloss", "net", "input_proj", "kernel")], sd["diffloss.net.input_proj.weight"].T
  )
  np.testing.assert_array_equal(flat[("backbone", "mask_token")], sd["mask_token"])


# ----------------------------------------------------------------------------- the KL VAE subcommand


def test_the_kl_vae_subcommand_converts_a_kl_checkpoint(tmp_path):
  c = kl_vae_config("tiny")
  ref = randomized(validate_config(c), seed=5)
  src = tmp_path / "kl_tiny.ckpt"
  torch.save({"model": ref.state_dict()}, src)
  config_file = tmp_path / "kl_tiny.py"
  config_file.write_text(
    "from hmar_jax.tokenizer.kl_vae import kl_vae_config\n\n\ndef get_config():\n  return kl_vae_config('tiny')\n"
  )
  assert convert_main(["kl_vae", str(src), str(tmp_path / "vae"), "--config", str(config_file)]) == 0
  loaded = load_kl_vae(tmp_path / "vae")
  got = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  np.testing.assert_array_equal(got["encoder.conv_in.kernel"], sd["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got["decoder.norm_out.scale"], sd["decoder.norm_out.weight"])


def test_the_kl_vae_subcommand_defaults_to_kl16_and_names_the_misshaped_keys(tmp_path, capsys):
  ref = randomized(validate_config(kl_vae_config("tiny")), seed=5)
  src = tmp_path / "kl_tiny.ckpt"
  torch.save({"model": ref.state_dict()}, src)
  assert convert_main(["kl_vae", str(src), str(tmp_path / "vae")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "kl_tiny.ckpt" in err and "missing" in err
  assert not (tmp_path / "vae").exists()
