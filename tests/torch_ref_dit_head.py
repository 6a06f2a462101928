"""Independent references for Hi-MAR's stage-2 diffusion-transformer head, written from the official
definitions (models/models.py DiT, models/diffloss.py GlobalDiffLoss, diffusion/gaussian_diffusion.py).

* `TorchGlobalHead`: a PyTorch re-statement of the official DiT with the official parameter names
  (state_dict keys 'net.*', 1x1 Conv2d patch embeddings, the pos_embed / c_pos_embed buffers) and the
  official NCHW interface: net(x (N, C, H, W), t, y, z (N, Cz, H, W)) -> (N, C, H, W).
* `ref_pos_embed_2d`: the 2-D sin-cos table, element by element in float64.
* NumPy float64 re-derivations (from the alpha-bars of tests/torch_ref_diffloss.RefSchedule) of the
  fixed-large reverse step, the known-token replacement and the masked MSE, on NCHW arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch_ref_diffloss import RefSchedule, torch_timestep_embedding

# ----------------------------------------------------------------------------- positions


def ref_pos_embed_2d(width: int, grid: int) -> np.ndarray:
  """(grid * grid, width) float64: token (row, col) at index row * grid + col; the first half of the
  channels encodes the column, the second the row; each half is sin(p f_k) then cos(p f_k) with
  f_k = 10000^(-4k / width), k < width / 4."""
  quarter = width // 4
  out = np.zeros((grid * grid, width), np.float64)
  for row in range(grid):
    for col in range(grid):
      for half, p in ((0, col), (1, row)):
        for k in range(quarter):
          f = 10000.0 ** (-k / quarter)
          out[row * grid + col, half * 2 * quarter + k] = math.sin(p * f)
          out[row * grid + col, half * 2 * quarter + quarter + k] = math.cos(p * f)
  return out


# ----------------------------------------------------------------------------- the network


class TorchPatchEmbed(nn.Module):
  def __init__(self, n_in: int, width: int):
    super().__init__()
    self.proj = nn.Conv2d(n_in, width, kernel_size=1, stride=1, bias=True)

  def forward(self, x):  # (N, I, H, W) -> (N, H * W, width), row-major tokens
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchAttention(nn.Module):
  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    b, n, w = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // self.heads), dim=-1)
    return self.proj((att @ v).transpose(1, 2).reshape(b, n, w))


class TorchMlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def _ln(x):
  return nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)


class TorchDiTBlock(nn.Module):
  def __init__(self, width: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.attn = TorchAttention(width, heads)
    self.mlp = TorchMlp(width, int(width * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

  def forward(self, x, c):
    sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + ga * self.attn(_ln(x) * (1 + ca) + sa)
    return x + gm * self.mlp(_ln(x) * (1 + cm) + sm)


class TorchFinal(nn.Module):
  def __init__(self, width: int, out_channels: int):
    super().__init__()
    self.linear = nn.Linear(width, out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
    return self.linear(_ln(x) * (1 + scale) + shift)


class TorchTimeEmbed(nn.Module):
  def __init__(self, width: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))

  def forward(self, t):
    return self.mlp(torch_timestep_embedding(t).to(self.mlp[0].weight.dtype))


class TorchDiT(nn.Module):
  def __init__(self, c: int, cz: int, depth: int, width: int, heads: int, mlp_ratio: float, grid: int):
    super().__init__()
    self.c, self.grid = c, grid
    self.x_embedder = TorchPatchEmbed(c, width)
    self.t_embedder = TorchTimeEmbed(width)
    self.c_embedder = TorchPatchEmbed(cz, width)
    table = torch.tensor(ref_pos_embed_2d(width, grid), dtype=torch.float32)[None]
    self.pos_embed = nn.Parameter(table, requires_grad=False)
    self.c_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width), requires_grad=False)
    self.blocks = nn.ModuleList([TorchDiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
    self.final_layer = TorchFinal(width, c)

  def forward(self, x, t, y, z):
    """x (N, C, H, W), t (N,), y (unused labels), z (N, Cz, H, W) -> eps (N, C, H, W)."""
    h = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t)[:, None] + self.c_embedder(z)
    for block in self.blocks:
      h = block(h, c)
    out = self.final_layer(h, c)  # (N, L, C)
    return out.transpose(1, 2).reshape(x.shape[0], self.c, self.grid, self.grid)

  def forward_with_cfg(self, x, t, y, z, cfg_scale):
    half = x[: len(x) // 2]
    eps = self.forward(torch.cat([half, half]), t, y, z)
    cond, uncond = torch.split(eps, len(eps) // 2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([guided, guided])


class TorchGlobalHead(nn.Module):
  def __init__(self, c=4, cz=12, depth=2, width=32, heads=4, mlp_ratio=4.0, grid=4):
    super().__init__()
    self.net = TorchDiT(c, cz, depth, width, heads, mlp_ratio, grid)


def randomized_torch_head(seed=0, **sizes) -> TorchGlobalHead:
  """A TorchGlobalHead whose every parameter is random and non-zero (the official init zeroes the
  adaLN and output layers, which would hide layout mistakes); the buffers stay as built."""
  torch.manual_seed(seed)
  m = TorchGlobalHead(**sizes)
  with torch.no_grad():
    for _, p in m.named_parameters():
      if p.requires_grad:
        fan_in = int(np.prod(p.shape[1:])) if p.ndim >= 2 else p.shape[0]
        p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
  return m.eval()


# ----------------------------------------------------------------------------- diffusion, float64, NCHW


def _b(v):
  return np.asarray(v, np.float64)[:, None, None, None]


def ref_q_sample(sched: RefSchedule, x0, t, noise):
  a = _b(sched.abar[t])
  return np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise


def ref_fixed_large_step(sched: RefSchedule, eps, xt, t, noise, temperature=1.0):
  """x_{t-1} from eps with the fixed-large variance: beta_t, and at t = 0 the posterior variance of t = 1."""
  a, ap, b = _b(sched.abar[t]), _b(sched.abar_prev[t]), _b(sched.beta[t])
  x0 = (xt - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
  mean = (np.sqrt(ap) * b * x0 + np.sqrt(1.0 - b) * (1.0 - ap) * xt) / (1.0 - a)
  var = np.where(t == 0, sched.posterior_var(np.ones_like(t)), sched.beta[t])
  return mean + _b(t != 0) * np.sqrt(_b(var)) * noise * temperature


def ref_replace_known(sched: RefSchedule, img, t, tokens, mask, init_noise):
  """The official loop's replacement: where mask (N, H, W) is False, the known tokens re-noised to t."""
  return np.where(mask[:, None], img, ref_q_sample(sched, tokens, t, init_noise))


def ref_masked_mse(eps, noise, mask):
  """Official training_losses with model_kwargs['mask'] (N, H, W): mean over C, H, W of the masked error."""
  return (((noise - eps) * mask[:, None]) ** 2).mean(axis=(1, 2, 3))
