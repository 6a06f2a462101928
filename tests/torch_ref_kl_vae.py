"""A PyTorch re-statement of MAR's KL VAE (LDM AutoencoderKL, LTH14/mar models/vae.py), NCHW, for tests.

Written from the official definition: the same module names (so `state_dict()` has the official keys)
and the same computation, configurable through the fields of hmar_jax's kl_vae_config.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _norm(channels: int, c) -> nn.GroupNorm:
  return nn.GroupNorm(c["norm_groups"], channels, eps=c["norm_eps"], affine=True)


class Resnet(nn.Module):
  def __init__(self, cin: int, cout: int, c):
    super().__init__()
    self.norm1 = _norm(cin, c)
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2 = _norm(cout, c)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
    return skip + h


class Attn(nn.Module):
  def __init__(self, channels: int, c):
    super().__init__()
    self.norm = _norm(channels, c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

  def forward(self, x):
    b, ch, hh, ww = x.shape
    y = self.norm(x)
    q = self.q(y).flatten(2).transpose(1, 2)  # (b, n, ch)
    k = self.k(y).flatten(2)  # (b, ch, n)
    v = self.v(y).flatten(2)  # (b, ch, n)
    attn = torch.softmax(q @ k / ch**0.5, dim=-1)  # (b, n query, n key)
    out = (v @ attn.transpose(1, 2)).reshape(b, ch, hh, ww)
    return x + self.proj_out(out)


class Down(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
  def __init__(self, channels: int, c):
    super().__init__()
    self.block_1, self.attn_1, self.block_2 = (
      Resnet(channels, channels, c),
      Attn(channels, c),
      Resnet(channels, channels, c),
    )

  def forward(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class TorchEncoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    ch, mult = c["ch"], list(c["ch_mult"])
    self.conv_in = nn.Conv2d(c["in_channels"], ch, 3, padding=1)
    self.down = nn.ModuleList()
    res, cin = c["resolution"], ch
    for i, m in enumerate(mult):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(c["num_res_blocks"]):
        level.block.append(Resnet(cin, ch * m, c))
        cin = ch * m
        if res in c["enc_attn_resolutions"]:
          level.attn.append(Attn(cin, c))
      if i < len(mult) - 1:
        level.downsample = Down(cin)
        res //= 2
      self.down.append(level)
    self.mid = Mid(cin, c)
    self.norm_out = _norm(cin, c)
    self.conv_out = nn.Conv2d(cin, 2 * c["embed_dim"], 3, padding=1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class TorchDecoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    ch, mult = c["ch"], list(c["ch_mult"])
    n = len(mult)
    cin = ch * mult[-1]
    res = c["resolution"] // 2 ** (n - 1)
    self.conv_in = nn.Conv2d(c["embed_dim"], cin, 3, padding=1)
    self.mid = Mid(cin, c)
    levels = [None] * n
    for i in reversed(range(n)):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(c["num_res_blocks"] + 1):
        level.block.append(Resnet(cin, ch * mult[i], c))
        cin = ch * mult[i]
        if res in c["dec_attn_resolutions"]:
          level.attn.append(Attn(cin, c))
      if i > 0:
        level.upsample = Up(cin)
        res *= 2
      levels[i] = level
    self.up = nn.ModuleList(levels)
    self.norm_out = _norm(cin, c)
    self.conv_out = nn.Conv2d(cin, c["in_channels"], 3, padding=1)

  def forward(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TorchAutoencoderKL(nn.Module):
  """encode(x NCHW) -> moments (B, 2E, h, w); decode(z (B, E, h, w)) -> images (B, 3, H, W)."""

  def __init__(self, c):
    super().__init__()
    e = c["embed_dim"]
    self.encoder = TorchEncoder(c)
    self.decoder = TorchDecoder(c)
    self.quant_conv = nn.Conv2d(2 * e, 2 * e, 1)
    self.post_quant_conv = nn.Conv2d(e, e, 1)

  def encode(self, x):
    return self.quant_conv(self.encoder(x))

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))


def randomized(c, seed: int = 0) -> TorchAutoencoderKL:
  """The re-statement with random weights, GroupNorm affine parameters included (not left at 1 / 0)."""
  torch.manual_seed(seed)
  model = TorchAutoencoderKL(c)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model.eval()
