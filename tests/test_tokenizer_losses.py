"""Tokenizer-training losses, PatchGAN discriminator, LPIPS network + weight loader, codebook updates.

References are independent: hand-computed NumPy values, and PyTorch restatements of taming's
NLayerDiscriminator and of lpips' LPIPS(net='vgg') run on the same random weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from hmar_jax.tokenizer import losses, perceptual
from hmar_jax.tokenizer.discriminator import NLayerDiscriminator
from hmar_jax.training.tasks import tokenizer as tok_train

# ----------------------------------------------------------------------------- losses


def test_hinge_d_loss_matches_hand_computed_values():
  real = np.array([2.0, 0.5, -1.0, 0.0], np.float32)  # relu(1 - r) = 0, .5, 2, 1   -> mean 0.875
  fake = np.array([-2.0, -0.5, 1.0, 0.25], np.float32)  # relu(1 + f) = 0, .5, 2, 1.25 -> mean 0.9375
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 0.5 * (0.875 + 0.9375), rtol=1e-6)


def test_hinge_g_loss_is_negative_mean_logit():
  fake = np.random.default_rng(0).normal(size=(2, 3, 3, 1)).astype(np.float32)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), -fake.astype(np.float64).mean(), rtol=1e-5)


def test_reconstruction_loss_weights_l1_and_l2():
  rng = np.random.default_rng(1)
  x, y = rng.uniform(-1, 1, (2, 4, 4, 3)), rng.uniform(-1, 1, (2, 4, 4, 3))
  want = 0.3 * np.abs(x - y).mean() + 2.0 * np.square(x - y).mean()
  got = losses.reconstruction_loss(
    jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), l1_weight=0.3, l2_weight=2.0
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="not both 0"):
    losses.reconstruction_loss(x, y, l1_weight=0.0, l2_weight=0.0)


def test_adaptive_disc_weight_is_clipped_gradient_norm_ratio():
  a = np.array([[3.0, 4.0]], np.float32)  # norm 5
  b = np.array([[0.0, 2.0]], np.float32)  # norm 2
  np.testing.assert_allclose(losses.adaptive_disc_weight(a, b), 5.0 / (2.0 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(losses.adaptive_disc_weight(a, 0 * b, max_weight=10.0), 10.0)


def test_disc_factor_switches_on_at_start_step():
  assert float(losses.disc_factor(jnp.int32(9), 10, 0.7)) == 0.0
  assert float(losses.disc_factor(jnp.int32(10), 10, 0.7)) == pytest.approx(0.7)


# ----------------------------------------------------------------------------- discriminator


def _torch_patchgan(params, norm_stats_layers, x_nchw):
  """taming NLayerDiscriminator (BatchNorm in training mode), restated with torch.nn.functional."""
  h = F.leaky_relu(F.conv2d(x_nchw, params["conv_in"][0], params["conv_in"][1], stride=2, padding=1), 0.2)
  for n, (w, gamma, beta) in enumerate(norm_stats_layers):
    stride = 2 if n < len(norm_stats_layers) - 1 else 1
    h = F.conv2d(h, w, None, stride=stride, padding=1)
    h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=1e-5)
    h = F.leaky_relu(h, 0.2)
  return F.conv2d(h, params["conv_out"][0], params["conv_out"][1], stride=1, padding=1)


def test_patchgan_matches_torch_restatement_and_updates_batch_stats():
  disc = NLayerDiscriminator(3, 8, 3, norm="batch", rngs=nnx.Rngs(0))
  x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  out = disc(jnp.asarray(x), train=True)
  assert out.shape == (2, 2, 2, 1)  # 32 -> 16 -> 8 -> 4 -> 3 (stride 1) -> 2
  t = lambda a: torch.from_numpy(np.array(a))
  conv_t = lambda c: t(np.asarray(c.kernel[...]).transpose(3, 2, 0, 1))
  params = {
    "conv_in": (conv_t(disc.conv_in), t(disc.conv_in.bias[...])),
    "conv_out": (conv_t(disc.conv_out), t(disc.conv_out.bias[...])),
  }
  layers = [(conv_t(c), t(n.scale[...]), t(n.bias[...])) for c, n in zip(disc.convs, disc.norms)]
  want = _torch_patchgan(params, layers, t(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-4)
  # training mode moved the running mean away from its zero init (momentum 0.9 == torch 0.1).
  assert float(jnp.abs(disc.norms[0].mean[...]).max()) > 0


def test_patchgan_init_follows_taming_weights_init():
  disc = NLayerDiscriminator(3, 32, 3, norm="batch", rngs=nnx.Rngs(1))
  k = np.asarray(disc.convs[2].kernel[...])
  assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
  s = np.asarray(disc.norms[2].scale[...])
  assert abs(s.mean() - 1.0) < 0.01 and 0.01 < s.std() < 0.03


# ----------------------------------------------------------------------------- LPIPS


def _random_lpips_torch_weights(seed=0):
  """Random VGG16 + lin weights in torchvision / lpips key layouts (He-scaled so activations stay O(1))."""
  g = torch.Generator().manual_seed(seed)
  vgg, lin = {}, {}
  in_ch = 3
  for idx, chans in zip(perceptual.VGG16_CONV_INDICES, perceptual.VGG16_CHANNELS):
    for i, c in zip(idx, chans):
      vgg[f"features.{i}.weight"] = torch.randn(c, in_ch, 3, 3, generator=g) * (2.0 / (9 * in_ch)) ** 0.5
      vgg[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.1
      in_ch = c
  for k, c in enumerate(perceptual.LPIPS_LAYER_CHANNELS):
    lin[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g)
  return vgg, lin


def _torch_lpips(vgg, lin, x, y):
  """lpips.LPIPS(net='vgg', version='0.1') forward, restated with torch.nn.functional (NCHW)."""
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def feats(z):
    z = (z - shift) / scale
    out = []
    for b, idx in enumerate(perceptual.VGG16_CONV_INDICES):
      if b:
        z = F.max_pool2d(z, 2, 2)
      for i in idx:
        z = F.relu(F.conv2d(z, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
      out.append(z)
    return out

  total = 0
  for k, (a, b) in enumerate(zip(feats(x), feats(y))):
    a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    total = total + F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"]).mean((2, 3), keepdim=True)
  return total.view(-1)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("lpips")
  vgg, lin = _random_lpips_torch_weights()
  torch.save({**vgg, "classifier.0.weight": torch.zeros(2, 2)}, d / "vgg16.pth")  # torchvision layout
  torch.save(lin, d / "lin.pth")  # lpips heads
  np.savez(d / "lpips.npz", **{k: v.numpy() for k, v in {**vgg, **lin}.items()})
  return d, vgg, lin


def test_lpips_matches_torch_restatement_from_pth_files(lpips_files):
  d, vgg, lin = lpips_files
  model = perceptual.load_lpips([d / "vgg16.pth", d / "lin.pth"])
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  got = np.asarray(model(jnp.asarray(x), jnp.asarray(y)))
  to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  want = _torch_lpips(vgg, lin, to_t(x), to_t(y)).numpy()
  assert got.shape == (2,) and np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x), jnp.asarray(x))), 0.0, atol=1e-7)


def test_lpips_npz_and_lpips_module_key_layouts_load_the_same_weights(lpips_files):
  d, vgg, lin = lpips_files
  from_npz = perceptual.load_lpips(d / "lpips.npz")
  # the whole lpips.LPIPS state_dict layout: net.slice{s}.{i}.*, lin{k}.model.1.weight, scaling_layer.*
  slice_of = {i: s + 1 for s, idx in enumerate(perceptual.VGG16_CONV_INDICES) for i in idx}
  full = {k.replace("features.", f"net.slice{slice_of[int(k.split('.')[1])]}."): v for k, v in vgg.items()}
  full.update(lin)
  full["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  full["scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
  torch.save(full, d / "lpips_full.pth")
  from_full = perceptual.load_lpips(d / "lpips_full.pth")
  a = jax.tree.leaves(nnx.state(from_npz, nnx.Param))
  b = jax.tree.leaves(nnx.state(from_full, nnx.Param))
  assert len(a) == 13 * 2 + 5
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)


def test_lpips_loader_names_missing_unexpected_and_misshaped_keys(lpips_files, tmp_path):
  d, vgg, lin = lpips_files
  with pytest.raises(perceptual.PerceptualWeightsError, match=r"missing key 'lin0'.*linear heads"):
    perceptual.load_lpips(d / "vgg16.pth")
  bad = {k: v.numpy() for k, v in {**vgg, **lin}.items()}
  bad["features.5.weight"] = bad["features.5.weight"][:, :10]
  bad["decoder.conv_out.weight"] = np.zeros(3)
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(perceptual.PerceptualWeightsError) as err:
    perceptual.load_lpips(tmp_path / "bad.npz")
  assert "shape of 'features.5.weight' is (128, 10, 3, 3), expected (128, 64, 3, 3)" in str(err.value)
  assert "unexpected key 'decoder.conv_out.weight'" in str(err.value)
  (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
  with pytest.raises(perceptual.PerceptualWeightsError, match="cannot read"):
    perceptual.load_lpips(tmp_path / "corrupt.npz")
  with pytest.raises(perceptual.PerceptualWeightsError, match="unsupported"):
    perceptual.read_weight_file(__file__)
  with pytest.raises(FileNotFoundError):
    perceptual.load_lpips(tmp_path / "nope.npz")


# ----------------------------------------------------------------------------- codebook updates


def test_ema_codebook_update_matches_numpy():
  rng = np.random.default_rng(4)
  V, C, N, decay, eps = 5, 3, 20, 0.9, 1e-5
  size, esum = rng.uniform(0.5, 2, V), rng.normal(size=(V, C))
  vecs, idx = rng.normal(size=(N, C)), rng.integers(0, V - 1, N)  # the last code is never hit
  counts = np.bincount(idx, minlength=V)
  sums = np.zeros((V, C))
  np.add.at(sums, idx, vecs)
  want_size = decay * size + (1 - decay) * counts
  want_sum = decay * esum + (1 - decay) * sums
  n = want_size.sum()
  want_codebook = want_sum / ((want_size + eps) / (n + V * eps) * n)[:, None]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  new_size, new_sum, codebook = tok_train.ema_codebook_update(
    f32(size), f32(esum), f32(vecs), jnp.asarray(idx, jnp.int32), decay=decay, eps=eps
  )
  np.testing.assert_allclose(new_size, want_size, rtol=1e-5)
  np.testing.assert_allclose(new_sum, want_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(codebook, want_codebook, rtol=1e-4, atol=1e-6)


def test_dead_codes_are_restarted_from_batch_vectors_after_threshold_steps():
  V, C = 4, 2
  codebook = jnp.arange(V * C, dtype=jnp.float32).reshape(V, C)
  unused = jnp.array([0, 2, 0, 1], jnp.int32)
  counts = jnp.array([3, 0, 1, 0], jnp.int32)  # code 1 reaches 3 unused steps, code 3 only 2
  candidates = jnp.full((6, C), -7.0) + jnp.arange(6, dtype=jnp.float32)[:, None]
  new_codebook, new_unused, dead = tok_train.restart_dead_codes(
    codebook, unused, counts, candidates, jax.random.key(0), threshold=3
  )
  np.testing.assert_array_equal(dead, [False, True, False, False])
  np.testing.assert_array_equal(new_unused, [0, 0, 0, 2])
  np.testing.assert_array_equal(np.delete(np.asarray(new_codebook), 1, 0), np.delete(np.asarray(codebook), 1, 0))
  row = np.asarray(new_codebook[1])
  assert row[0] == row[1] and -7.0 <= row[0] <= -2.0  # one of the candidate vectors
