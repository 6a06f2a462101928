"""The Flax VQVAE is numerically the official PyTorch one.

`TorchVQVAE` below restates the official forward (VAR models/{basic_vae,quant,vqvae}.py,
HMAR's quant.py additions) with torch.nn primitives and the official module/key layout; its
state_dict is converted with hmar_jax.convert.vqvae and both models are run on the same
inputs. Tiny channel config (configs/vqvae.py:tiny) keeps it fast; the full 160-channel
config is only built abstractly (shapes, keys).
"""

from __future__ import annotations

import math
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flax import nnx  # noqa: E402

from configs.vqvae import get_config  # noqa: E402
from hmar_jax.convert.vqvae import convert_vqvae_state_dict  # noqa: E402
from hmar_jax.tokenizer import VQVAE, abstract_vqvae  # noqa: E402

# float32 end to end; differences come from summation order only.
ATOL = 2e-5


# ============================================================================ PyTorch restatement


def _gn(c):
  return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class TResnet(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, 1, 1)
    self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, 1, 1)
    self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return self.nin_shortcut(x) + h


class TAttn(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm, self.qkv, self.proj_out = _gn(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

  def forward(self, x):
    b, c, h, w = x.shape
    q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # (B, C, N) each
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
    return x + self.proj_out(torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w))


class TDown(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class TUp(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TMid(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.block_1, self.attn_1, self.block_2 = TResnet(c, c), TAttn(c), TResnet(c, c)

  def forward(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class TEncoder(nn.Module):
  def __init__(self, ch, ch_mult, nrb, z):
    super().__init__()
    self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
    self.down = nn.ModuleList()
    cin = ch
    for i, m in enumerate(ch_mult):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(nrb):
        level.block.append(TResnet(cin, ch * m))
        cin = ch * m
        if i == len(ch_mult) - 1:
          level.attn.append(TAttn(cin))
      if i != len(ch_mult) - 1:
        level.downsample = TDown(cin)
      self.down.append(level)
    self.mid = TMid(cin)
    self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, z, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      for j, blk in enumerate(level.block):
        h = blk(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class TDecoder(nn.Module):
  def __init__(self, ch, ch_mult, nrb, z):
    super().__init__()
    cin = ch * ch_mult[-1]
    self.conv_in = nn.Conv2d(z, cin, 3, 1, 1)
    self.mid = TMid(cin)
    ups = []
    for i in reversed(range(len(ch_mult))):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(nrb + 1):
        level.block.append(TResnet(cin, ch * ch_mult[i]))
        cin = ch * ch_mult[i]
        if i == len(ch_mult) - 1:
          level.attn.append(TAttn(cin))
      if i != 0:
        level.upsample = TUp(cin)
      ups.insert(0, level)
    self.up = nn.ModuleList(ups)
    self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, 3, 3, 1, 1)

  def forward(self, z):
    h = self.mid(self.conv_in(z))
    for i in reversed(range(len(self.up))):
      level = self.up[i]
      for j, blk in enumerate(level.block):
        h = blk(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TPhi(nn.Conv2d):
  def __init__(self, c):
    super().__init__(c, c, 3, 1, 1)

  def forward(self, h):
    return 0.5 * h + 0.5 * super().forward(h)


class TQuantResi(nn.Module):  # official PhiPartiallyShared with 4 phis
  def __init__(self, c):
    super().__init__()
    self.qresi_ls = nn.ModuleList([TPhi(c) for _ in range(4)])
    self.ticks = np.linspace(1 / 12, 11 / 12, 4)

  def __getitem__(self, at):
    return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class TQuantize(nn.Module):
  def __init__(self, vocab, c, patch_nums, beta=0.25):
    super().__init__()
    self.pns, self.c, self.beta = tuple(patch_nums), c, beta
    self.quant_resi = TQuantResi(c)
    self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab))
    self.embedding = nn.Embedding(vocab, c)

  def phi(self, si, h):
    return self.quant_resi[si / (len(self.pns) - 1)](h)

  def up(self, h):
    return F.interpolate(h, size=(self.pns[-1],) * 2, mode="bicubic")

  def emb(self, idx):  # (B, h, w) -> (B, C, h, w)
    return self.embedding(idx).permute(0, 3, 1, 2)

  def quantize(self, f):
    """Returns (indices [(B, pn, pn)], f_hats per scale, vq_loss) like official forward."""
    f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
    idxs, fhats, loss = [], [], 0.0
    last = len(self.pns) - 1
    w = self.embedding.weight.data
    for si, pn in enumerate(self.pns):
      z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
      z = z.permute(0, 2, 3, 1).reshape(-1, self.c)
      d = z.square().sum(1, keepdim=True) + w.square().sum(1)
      d.addmm_(z, w.T, alpha=-2, beta=1)
      idx = d.argmin(1).view(f.shape[0], pn, pn)
      h = self.emb(idx)
      h = self.phi(si, self.up(h) if si != last else h)
      f_hat = f_hat + h
      f_rest = f_rest - h.detach()
      idxs.append(idx)
      fhats.append(f_hat)
      loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
    return idxs, fhats, loss / len(self.pns)

  def indices_to_fhat(self, idxs):
    f_hat = 0
    for si, idx in enumerate(idxs):
      h = self.emb(idx)
      f_hat = f_hat + self.phi(si, self.up(h) if si != len(self.pns) - 1 else h)
    return f_hat

  def teacher_forcing_inputs(self, idxs):  # official idxBl_to_var_input
    f_hat, out = 0, []
    for si in range(len(self.pns) - 1):
      f_hat = f_hat + self.phi(si, self.up(self.emb(idxs[si])))
      pn = self.pns[si + 1]
      out.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(out, 1)

  def scale_contributions(self, idxs):  # official idxBl_to_mask_input without masking
    out = []
    for si in range(1, len(self.pns)):
      pn = self.pns[si]
      h = self.phi(si, self.up(self.emb(idxs[si])))
      out.append(F.interpolate(h, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(out, 1)

  def next_ar_input(self, si, f_hat, h):  # official get_next_autoregressive_input
    if si != len(self.pns) - 1:
      f_hat = f_hat + self.phi(si, self.up(h))
      pn = self.pns[si + 1]
      return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
    f_hat = f_hat + self.phi(si, h)
    return f_hat, f_hat

  def next_mask_input(self, si, f_hat, h):  # HMAR get_next_mask_input
    pn = self.pns[si]
    h = self.phi(si, self.up(h))
    return F.interpolate(f_hat, size=(pn, pn), mode="area"), F.interpolate(h, size=(pn, pn), mode="area")


class TorchVQVAE(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.encoder = TEncoder(c.ch, c.ch_mult, c.num_res_blocks, c.z_channels)
    self.decoder = TDecoder(c.ch, c.ch_mult, c.num_res_blocks, c.z_channels)
    self.quantize = TQuantize(c.vocab_size, c.z_channels, c.patch_nums, c.beta)
    self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 3, 1, 1)
    self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 3, 1, 1)

  def features(self, x):
    return self.quant_conv(self.encoder(x))

  def fhat_to_img(self, f_hat):
    return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

  def forward(self, x):  # official training forward
    f = self.features(x)
    idxs, fhats, loss = self.quantize.quantize(f)
    f_st = (fhats[-1].detach() - f.detach()) + f
    return self.decoder(self.post_quant_conv(f_st)), loss, idxs


def randomized_torch_vqvae(config, seed=0):
  """A TorchVQVAE whose every tensor (GroupNorm affine, biases, buffer included) is random."""
  torch.manual_seed(seed)
  model = TorchVQVAE(config).eval()
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith("ema_vocab_hit_SV"):
        t.copy_(torch.rand_like(t) * 10)
      elif "norm" in name and name.endswith("weight"):
        t.copy_(1 + 0.2 * torch.randn_like(t))
      elif name.endswith("embedding.weight"):
        t.copy_(torch.randn_like(t))
      elif name.endswith("bias"):
        t.copy_(0.1 * torch.randn_like(t))
  return model


def to_nhwc(t):
  return jnp.asarray(t.detach().permute(0, 2, 3, 1).numpy())


def to_np(t):
  return t.detach().numpy()


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def tiny():
  return get_config("tiny")


@pytest.fixture(scope="module")
def pair(tiny):
  """(torch model, converted Flax model, images NCHW torch, images NHWC jax)."""
  tm = randomized_torch_vqvae(tiny)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  jm = convert_vqvae_state_dict(sd, tiny)
  g = torch.Generator().manual_seed(1)
  x = torch.rand(2, 3, tiny.image_size, tiny.image_size, generator=g) * 2 - 1
  return tm, jm, x, to_nhwc(x)


# ============================================================================ parity


def test_encoder_features_match_torch(pair):
  tm, jm, x, xj = pair
  chex.assert_trees_all_close(jm.encode_features(xj), to_nhwc(tm.features(x)), atol=ATOL, rtol=1e-5)


def test_encode_indices_equal_torch(pair):
  tm, jm, x, xj = pair
  t_idx = tm.quantize.quantize(tm.features(x))[0]
  j_idx = jm.encode_indices(xj)
  for si, (a, b) in enumerate(zip(j_idx, t_idx)):
    np.testing.assert_array_equal(np.asarray(a), to_np(b), err_msg=f"scale {si}")


def test_fhat_and_decoded_image_match_torch(pair):
  tm, jm, x, xj = pair
  idx = [torch.tensor(np.asarray(i)).long() for i in jm.encode_indices(xj)]
  t_fhat = tm.quantize.indices_to_fhat(idx)
  j_fhat = jm.indices_to_fhat([jnp.asarray(i.numpy()) for i in idx])
  chex.assert_trees_all_close(j_fhat, to_nhwc(t_fhat), atol=ATOL, rtol=1e-5)
  chex.assert_trees_all_close(jm.fhat_to_image(j_fhat), to_nhwc(tm.fhat_to_img(t_fhat)), atol=1e-4, rtol=1e-4)


def test_reconstruction_matches_torch(pair):
  tm, jm, x, xj = pair
  t_rec = tm.fhat_to_img(tm.quantize.quantize(tm.features(x))[1][-1])
  chex.assert_trees_all_close(jm.reconstruct(xj), to_nhwc(t_rec), atol=1e-4, rtol=1e-4)


def test_teacher_forcing_and_scale_contributions_match_torch(pair, tiny):
  tm, jm, x, xj = pair
  g = torch.Generator().manual_seed(2)
  idx = [torch.randint(0, tiny.vocab_size, (2, pn, pn), generator=g) for pn in tiny.patch_nums]
  jidx = [jnp.asarray(i.numpy()) for i in idx]
  q = jm.quantizer
  chex.assert_trees_all_close(
    q.teacher_forcing_inputs(jidx), to_np(tm.quantize.teacher_forcing_inputs(idx)), atol=ATOL, rtol=1e-5
  )
  chex.assert_trees_all_close(
    q.scale_contributions(jidx), to_np(tm.quantize.scale_contributions(idx)), atol=ATOL, rtol=1e-5
  )


def test_incremental_sampling_steps_match_torch(pair, tiny):
  tm, jm, x, xj = pair
  g = torch.Generator().manual_seed(3)
  q, tq = jm.quantizer, tm.quantize
  side = tiny.patch_nums[-1]
  t_fhat = torch.zeros(2, tiny.z_channels, side, side)
  j_fhat = jnp.zeros((2, side, side, tiny.z_channels))
  for si, pn in enumerate(tiny.patch_nums):
    idx = torch.randint(0, tiny.vocab_size, (2, pn * pn), generator=g)
    h = tq.emb(idx.view(2, pn, pn))
    t_mask = tq.next_mask_input(si, t_fhat, h)
    j_mask = q.mask_step_inputs(si, j_fhat, jnp.asarray(idx.numpy()))
    for a, b in zip(j_mask, t_mask):
      chex.assert_trees_all_close(a, to_np(b.flatten(2).transpose(1, 2)), atol=ATOL, rtol=1e-5)
    t_fhat, t_next = tq.next_ar_input(si, t_fhat, h)
    j_fhat, j_next = q.update_fhat(si, j_fhat, jnp.asarray(idx.numpy()))
    chex.assert_trees_all_close(j_fhat, to_nhwc(t_fhat), atol=ATOL, rtol=1e-5)
    chex.assert_trees_all_close(j_next, to_np(t_next.flatten(2).transpose(1, 2)), atol=ATOL, rtol=1e-5)


def test_training_forward_and_gradients_match_torch(pair):
  """recon, vq_loss and the gradients of (mean recon^2 + vq_loss) through the straight-through f_hat."""
  tm, jm, x, xj = pair
  tm.zero_grad()
  t_rec, t_loss, _ = tm(x)
  (t_rec.square().mean() + t_loss).backward()

  def loss_fn(model):
    rec, vq, _ = model(xj, train=False)
    return jnp.mean(rec**2) + vq, (rec, vq)

  (_, (j_rec, j_loss)), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(jm)
  chex.assert_trees_all_close(j_rec, to_nhwc(t_rec), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(float(j_loss), t_loss.item(), rtol=1e-4)
  # codebook (through f_hat in the codebook loss), phi, encoder (through commitment + ST) and decoder
  checks = {
    ("quantizer", "embedding", "embedding"): tm.quantize.embedding.weight.grad.numpy(),
    ("quantizer", "phis", 0, "conv", "kernel"): tm.quantize.quant_resi.qresi_ls[0]
    .weight.grad.numpy()
    .transpose(2, 3, 1, 0),
    ("encoder", "conv_in", "kernel"): tm.encoder.conv_in.weight.grad.numpy().transpose(2, 3, 1, 0),
    ("decoder", "conv_out", "bias"): tm.decoder.conv_out.bias.grad.numpy(),
  }
  flat = dict(nnx.to_flat_state(grads))
  for path, want in checks.items():
    got = np.asarray(flat[path].get_value())
    scale = np.abs(want).max()
    assert scale > 0, path
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=1e-3, err_msg=str(path))


# ============================================================================ full official config (abstract)


def test_full_config_parameter_count_and_shapes():
  c = get_config()
  model = abstract_vqvae(c)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with torch.device("meta"):
    ref = TorchVQVAE(c)
  n_ref = sum(p.numel() for p in ref.parameters())
  assert n == n_ref
  f = jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32)
  out = nnx.eval_shape(lambda m, z: m.fhat_to_image(z), model, f)
  assert out.shape == (1, 256, 256, 3)
  enc = nnx.eval_shape(lambda m, x: m.encoder(x), model, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert enc.shape == (1, 16, 16, 32)


# ============================================================================ bad input


@pytest.fixture(scope="module")
def tiny_model(pair):
  return pair[1]


@pytest.mark.parametrize(
  "shape, match",
  [
    ((2, 32, 32, 3), r"\(B, 16, 16, 3\)"),  # wrong resolution
    ((2, 3, 16, 16), r"NCHW"),  # channels-first
    ((16, 16, 3), r"\(B, 16, 16, 3\)"),  # no batch axis
  ],
)
def test_wrong_image_shape_is_a_clear_error(tiny_model, shape, match):
  with pytest.raises(ValueError, match=match):
    tiny_model.encode_indices(jnp.zeros(shape))


def test_image_value_range_is_checked(tiny_model):
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    tiny_model.encode_indices(jnp.full((1, 16, 16, 3), 255.0))


def test_wrong_image_shape_fails_while_tracing_under_jit(tiny_model):
  with pytest.raises(ValueError, match=r"\(B, 16, 16, 3\)"):
    nnx.jit(lambda m, x: m.encode_indices(x))(tiny_model, jnp.zeros((1, 24, 24, 3)))


def test_resolution_that_patch_nums_does_not_fit(tiny):
  c = get_config("tiny")
  c.patch_nums = (1, 2, 3, 5, 10)  # needs 20 px, config says 16
  with pytest.raises(ValueError, match="does not fit patch_nums"):
    VQVAE(c, rngs=nnx.Rngs(0))
  full = get_config("512")
  full.image_size = 256
  with pytest.raises(ValueError, match="does not fit patch_nums"):
    abstract_vqvae(full)


def test_codebook_size_mismatch_of_indices(tiny_model, tiny):
  idx = [jnp.zeros((1, pn, pn), jnp.int32) for pn in tiny.patch_nums]
  idx[2] = idx[2].at[0, 0, 0].set(tiny.vocab_size)  # a token of a 2x larger codebook
  with pytest.raises(ValueError, match="outside the codebook"):
    tiny_model.decode_indices(idx)
