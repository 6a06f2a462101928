"""MAR's KL-16 VAE in NNX: the official architecture, numerical parity with a PyTorch re-statement of the
official AutoencoderKL, the posterior maths, the converter and the checkpoint round trip."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref_kl_vae import TorchAutoencoderKL, randomized  # noqa: E402

from hmar_jax import checkpoint  # noqa: E402
from hmar_jax.convert.common import ConversionError  # noqa: E402
from hmar_jax.convert.kl_vae import (  # noqa: E402
  convert_kl_vae_file,
  convert_kl_vae_state_dict,
  expected_state_dict_shapes,
)
from hmar_jax.tokenizer.kl_vae import (  # noqa: E402
  KLVAE,
  abstract_kl_vae,
  kl,
  kl_vae_config,
  load_kl_vae,
  mode,
  sample_latents,
  save_kl_vae,
  validate_config,
)

# float32 parity with the PyTorch re-statement (both in float32, matmuls at full precision):
# differences come from summation order only, measured at most 6e-6 on outputs of magnitude up to 2.
ATOL = RTOL = 1e-4


def tiny_config(**changes):
  c = kl_vae_config("tiny")
  for k, v in changes.items():
    setattr(c, k, v)
  return c


def random_model(config, seed: int = 0) -> KLVAE:
  """A KLVAE with random weights, built without compiling initialisers (fast on CPU)."""
  rng = np.random.default_rng(seed)
  sd = {k: (rng.normal(size=s) * 0.2).astype(np.float32) for k, s in expected_state_dict_shapes(config).items()}
  return convert_kl_vae_state_dict(sd, config)


def params_of(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def torch_sd(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_torch():
  # Decoder attention on as well (kl16 has none there), so that code path is compared too.
  return randomized(validate_config(tiny_config(dec_attn_resolutions=(8,))), seed=3)


# ----------------------------------------------------------------------------- architecture


def test_kl16_maps_256px_images_to_16x16x16_latents_and_back_without_computing():
  model = abstract_kl_vae(kl_vae_config("kl16"))
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  moments = nnx.eval_shape(lambda m, x: m.encode(x), model, images)
  assert moments.shape == (2, 16, 16, 32)
  latents = nnx.eval_shape(lambda m, x: m.mode(m.encode(x)), model, images)
  assert latents.shape == (2, 16, 16, 16)
  decoded = nnx.eval_shape(lambda m, z: m.decode(z), model, latents)
  assert decoded.shape == (2, 256, 256, 3)


def test_kl16_has_exactly_the_official_keys_and_shapes():
  c = validate_config(kl_vae_config("kl16"))
  with torch.device("meta"):
    ref = TorchAutoencoderKL(c)
  official = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert expected_state_dict_shapes(kl_vae_config("kl16")) == official
  # Attention: encoder level 4 (16 px of 256) and the two middles, nowhere in the decoder's levels.
  attn_levels = {k.split(".attn.")[0] for k in official if ".attn." in k}
  assert attn_levels == {"encoder.down.4"}
  assert "encoder.mid.attn_1.q.weight" in official and "decoder.mid.attn_1.q.weight" in official


def test_images_in_nchw_layout_are_refused_with_a_hint():
  model = abstract_kl_vae(tiny_config())
  with pytest.raises(ValueError, match=r"NCHW\?"):
    model.check_images(jnp.zeros((1, 3, 32, 32)))


# ----------------------------------------------------------------------------- parity with torch


def test_converted_tiny_model_matches_torch_moments_and_decoded_images(tiny_torch):
  c = validate_config(tiny_config(dec_attn_resolutions=(8,)))
  model = convert_kl_vae_state_dict(torch_sd(tiny_torch), c)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 8, 8, 16)).astype(np.float32)
  with torch.no_grad():
    want_moments = tiny_torch.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    want_images = tiny_torch.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(model.encode(jnp.asarray(x))), want_moments, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(model.decode(jnp.asarray(z))), want_images, atol=ATOL, rtol=RTOL)
  assert np.std(want_images) > 0.1  # a non-trivial output was compared


# ----------------------------------------------------------------------------- posterior


def _moments_with_extreme_logvars(seed=0):
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=(3, 4, 4, 16))
  logvar = rng.normal(size=(3, 4, 4, 16)) * 2
  logvar[0, 0, 0, :4] = [-45.0, -31.0, 21.0, 35.0]  # beyond the official clamp [-30, 20]
  return np.concatenate([mean, logvar], axis=-1).astype(np.float32)


def test_kl_matches_the_float64_formula_with_the_official_logvar_clamp():
  m = _moments_with_extreme_logvars().astype(np.float64)
  mean, logvar = m[..., :16], np.clip(m[..., 16:], -30.0, 20.0)
  want = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(kl(jnp.asarray(m, jnp.float32))), want, rtol=1e-5)


def test_sample_is_mean_plus_std_times_the_normal_draw_of_the_key():
  m = _moments_with_extreme_logvars(1)
  key = jax.random.key(5)
  eps = np.asarray(jax.random.normal(key, (3, 4, 4, 16), jnp.float32), np.float64)
  mean, logvar = m[..., :16].astype(np.float64), np.clip(m[..., 16:].astype(np.float64), -30, 20)
  want = mean + np.exp(0.5 * logvar) * eps
  np.testing.assert_allclose(np.asarray(sample_latents(jnp.asarray(m), key)), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mode(jnp.asarray(m))), m[..., :16])


def test_samples_have_the_posterior_mean_and_standard_deviation():
  mean = np.array([[[[-1.0, 0.5, 2.0]]]], np.float32)
  logvar = np.array([[[[0.0, np.log(0.25), np.log(4.0)]]]], np.float32)
  m = jnp.asarray(np.broadcast_to(np.concatenate([mean, logvar], -1), (4096, 1, 1, 6)))
  s = np.asarray(sample_latents(m, jax.random.key(0)), np.float64).reshape(-1, 3)
  std = np.array([1.0, 0.5, 2.0])
  # 4096 draws: the sample mean is within 5 standard errors, the sample std within 5 of its own.
  np.testing.assert_array_less(np.abs(s.mean(0) - mean.ravel()), 5 * std / np.sqrt(4096))
  np.testing.assert_array_less(np.abs(s.std(0) - std), 5 * std / np.sqrt(2 * 4096))


def test_mar_tokens_are_scaled_latents_and_decode_undoes_the_scale():
  c = kl_vae_config("tiny")
  c.latent_scale = 0.2325
  model = random_model(c)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  key = jax.random.key(1)
  tokens = model.encode_latents(x, key)
  np.testing.assert_allclose(tokens, sample_latents(model.encode(x), key) * 0.2325, rtol=1e-6)
  np.testing.assert_allclose(model.decode_latents(tokens), model.decode(tokens / 0.2325), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- converter


def test_converter_puts_every_official_tensor_in_place_and_accepts_the_model_wrapper(tiny_torch):
  c = validate_config(tiny_config(dec_attn_resolutions=(8,)))
  sd = torch_sd(tiny_torch)
  loss_keys = {"loss.logvar": np.zeros(()), "loss.discriminator.main.0.weight": np.ones((4, 3, 4, 4), np.float32)}
  notes = []
  model = convert_kl_vae_state_dict({"model": {**sd, **loss_keys}, "epoch": 3}, c, log=notes.append)
  got = params_of(model)
  assert len(got) == len(sd)
  for key, value in sd.items():
    path = key.rsplit(".", 1)[0]
    if key.endswith(".bias"):
      np.testing.assert_array_equal(got[f"{path}.bias"], value)
    elif value.ndim == 4:
      np.testing.assert_array_equal(got[f"{path}.kernel"], value.transpose(2, 3, 1, 0))
    else:
      np.testing.assert_array_equal(got[f"{path}.scale"], value)
  assert notes == ["note: dropped 2 training-loss tensor(s) under 'loss.'"]


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda sd: sd.pop("encoder.down.2.attn.0.k.weight"),
      r"missing 1 key\(s\):\n  encoder\.down\.2\.attn\.0\.k\.weight",
    ),
    (
      lambda sd: sd.__setitem__("decoder.up.0.attn.0.qkv.weight", np.zeros((3, 3, 1, 1), np.float32)),
      r"unexpected 1 key\(s\):\n  decoder\.up\.0\.attn\.0\.qkv\.weight",
    ),
    (
      lambda sd: sd.__setitem__("quant_conv.weight", np.zeros((32, 32, 3, 3), np.float32)),
      r"quant_conv\.weight: has shape \(32, 32, 3, 3\), expected \(32, 32, 1, 1\)",
    ),
  ],
  ids=["missing", "unexpected", "misshaped"],
)
def test_converter_names_the_key_that_does_not_fit(edit, message):
  sd = {k: np.zeros(s, np.float32) for k, s in expected_state_dict_shapes(tiny_config()).items()}
  edit(sd)
  with pytest.raises(ConversionError, match=message):
    convert_kl_vae_state_dict(sd, tiny_config(), source_name="kl16.ckpt")


def test_converted_file_loads_back_with_the_official_weights(tiny_torch, tmp_path):
  c = tiny_config(dec_attn_resolutions=(8,))
  src = tmp_path / "kl_tiny.ckpt"
  torch.save({"model": tiny_torch.state_dict()}, src)
  out = convert_kl_vae_file(src, tmp_path / "converted", c, log=lambda s: None)
  loaded = load_kl_vae(out)
  got = params_of(loaded)
  sd = torch_sd(tiny_torch)
  np.testing.assert_array_equal(
    got["decoder.up.2.attn.0.v.kernel"], sd["decoder.up.2.attn.0.v.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(got["encoder.norm_out.scale"], sd["encoder.norm_out.weight"])
  with pytest.raises(FileExistsError, match="already exists"):
    convert_kl_vae_file(src, out, c, log=lambda s: None)


# ----------------------------------------------------------------------------- checkpoints


def test_saved_model_loads_with_identical_parameters_and_config(tmp_path):
  model = random_model(tiny_config(), seed=4)
  path = save_kl_vae(tmp_path / "vae", model)
  loaded = load_kl_vae(path)
  assert loaded.config == model.config
  a, b = params_of(model), params_of(loaded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_loading_with_another_architecture_names_the_mismatched_keys(tmp_path):
  path = save_kl_vae(tmp_path / "vae", random_model(tiny_config()))
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"encoder.*conv_out"):
    load_kl_vae(path, tiny_config(embed_dim=8))


def test_a_checkpoint_of_another_kind_is_refused_by_name(tmp_path):
  path = checkpoint.save_params(tmp_path / "vq", random_model(tiny_config()), metadata={"kind": "hmar_jax.vqvae"})
  with pytest.raises(ValueError, match="'hmar_jax.vqvae' checkpoint, not a KL VAE"):
    load_kl_vae(path)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("enc_attn_resolutions", (12,), r"\[12\] match no level"),
    ("image_size", 34, "not divisible by the downsampling factor 4"),
    ("ch", 24, "not divisible by norm_groups"),
  ],
)
def test_a_bad_architecture_is_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    validate_config(tiny_config(**{field: value}))
