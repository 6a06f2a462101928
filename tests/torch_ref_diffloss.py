"""Independent references for MAR's diffusion loss head, written from the official definitions.

* `TorchDiffLoss`: a PyTorch re-statement of the official DiffLoss's network (SimpleMLPAdaLN) with
  the official parameter names (state_dict keys 'net.*'), plus its classifier-free-guidance forward.
* NumPy float64 re-derivations of the Gaussian diffusion quantities, written in terms of the
  cumulative alpha-bar (rather than the coefficient tables the code under test keeps): the cosine
  schedule, the even respacing, q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the learned-range
  reverse step and the hybrid (MSE + variational bound) loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------- the network


def torch_timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
  angles = t[:, None].float() * freqs[None]
  return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _adaln(width: int, chunks: int) -> nn.Sequential:
  return nn.Sequential(nn.SiLU(), nn.Linear(width, chunks * width))


class TorchResBlock(nn.Module):
  def __init__(self, width: int):
    super().__init__()
    self.in_ln = nn.LayerNorm(width, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
    self.adaLN_modulation = _adaln(width, 3)

  def forward(self, x, y):
    shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
    return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class TorchFinalLayer(nn.Module):
  def __init__(self, width: int, out_channels: int):
    super().__init__()
    self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(width, out_channels)
    self.adaLN_modulation = _adaln(width, 2)

  def forward(self, x, y):
    shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
    return self.linear(self.norm_final(x) * (1 + scale) + shift)


class TorchTimeEmbed(nn.Module):
  def __init__(self, width: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))

  def forward(self, t):
    # the official embedding is float32; cast for a float64 copy of the network
    return self.mlp(torch_timestep_embedding(t).to(self.mlp[0].weight.dtype))


class TorchMLPAdaLN(nn.Module):
  def __init__(self, in_channels: int, width: int, z_channels: int, depth: int):
    super().__init__()
    self.in_channels = in_channels
    self.time_embed = TorchTimeEmbed(width)
    self.cond_embed = nn.Linear(z_channels, width)
    self.input_proj = nn.Linear(in_channels, width)
    self.res_blocks = nn.ModuleList([TorchResBlock(width) for _ in range(depth)])
    self.final_layer = TorchFinalLayer(width, 2 * in_channels)

  def forward(self, x, t, c):
    h = self.input_proj(x)
    y = self.time_embed(t) + self.cond_embed(c)
    for block in self.res_blocks:
      h = block(h, y)
    return self.final_layer(h, y)

  def forward_with_cfg(self, x, t, c, cfg_scale):
    n = x.shape[0] // 2
    out = self.forward(torch.cat([x[:n], x[:n]]), t, c)
    eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
    guided = eps[n:] + cfg_scale * (eps[:n] - eps[n:])
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class TorchDiffLoss(nn.Module):
  """Holds the network as `.net`, so its state_dict keys are the official DiffLoss ones."""

  def __init__(self, target_channels: int, z_channels: int, depth: int, width: int):
    super().__init__()
    self.net = TorchMLPAdaLN(target_channels, width, z_channels, depth)


def randomized_torch_diffloss(target_channels=4, z_channels=12, depth=2, width=32, seed=0) -> TorchDiffLoss:
  """A TorchDiffLoss whose every parameter is random and non-zero (the official init zeroes the
  adaLN and output layers, which would hide layout mistakes); LayerNorm scales around 1."""
  torch.manual_seed(seed)
  m = TorchDiffLoss(target_channels, z_channels, depth, width)
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith("in_ln.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        fan_in = p.shape[1] if p.ndim == 2 else p.shape[0]
        p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
  return m.eval()


# ----------------------------------------------------------------------------- diffusion, float64


def ref_alpha_bar(s: np.ndarray | float) -> np.ndarray:
  return np.cos((np.asarray(s, np.float64) + 0.008) / 1.008 * np.pi / 2) ** 2


def ref_cosine_betas(num_steps: int = 1000) -> np.ndarray:
  i = np.arange(num_steps, dtype=np.float64)
  return np.minimum(1.0 - ref_alpha_bar((i + 1) / num_steps) / ref_alpha_bar(i / num_steps), 0.999)


def ref_kept_steps(num_sampling_steps: int, num_steps: int = 1000) -> np.ndarray:
  """Even spacing over [0, T-1] rounded to the nearest step (one section)."""
  return np.round(np.linspace(0, num_steps - 1, num_sampling_steps)).astype(np.int64)


class RefSchedule:
  """Alpha-bars of the kept steps of the 1000-step cosine process (all steps if kept is None)."""

  def __init__(self, kept: np.ndarray | None = None, num_steps: int = 1000):
    abar_all = np.cumprod(1.0 - ref_cosine_betas(num_steps))
    self.kept = np.arange(num_steps) if kept is None else np.asarray(kept)
    self.abar = abar_all[self.kept]
    self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])
    self.beta = 1.0 - self.abar / self.abar_prev  # the step's own beta, from the alpha-bars

  def posterior_var(self, t):
    return (1.0 - self.abar_prev[t]) / (1.0 - self.abar[t]) * self.beta[t]

  def posterior_log_var_clipped(self, t):
    t = np.asarray(t)
    return np.log(self.posterior_var(np.where(t == 0, 1, t)))

  def q_sample(self, x0, t, noise):
    a = self.abar[t][:, None]
    return np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise

  def posterior_mean(self, x0, xt, t):
    a, ap, b = self.abar[t][:, None], self.abar_prev[t][:, None], self.beta[t][:, None]
    return (np.sqrt(ap) * b * x0 + np.sqrt(1.0 - b) * (1.0 - ap) * xt) / (1.0 - a)

  def p_mean_logvar(self, out, xt, t):
    """Learned-range reverse step from a model output (N, 2C): (mean, log variance, x0 estimate)."""
    c = xt.shape[1]
    eps, v = out[:, :c], out[:, c:]
    a = self.abar[t][:, None]
    x0 = (xt - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
    lo, hi = self.posterior_log_var_clipped(t)[:, None], np.log(self.beta[t])[:, None]
    logvar = lo + (v + 1.0) / 2.0 * (hi - lo)
    return self.posterior_mean(x0, xt, t), logvar, x0


def ref_gaussian_kl(m1, lv1, m2, lv2):
  return 0.5 * (lv2 - lv1 + (np.exp(lv1) + (m1 - m2) ** 2) / np.exp(lv2) - 1.0)


def ref_decoder_log_likelihood(x, mean, log_std):
  """log of the probability mass of the bin of width 2/255 around x (edge bins open), with the
  tanh approximation of the normal CDF that the official code uses."""
  cdf = lambda u: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u**3)))
  hi = cdf((x - mean + 1.0 / 255.0) / np.exp(log_std))
  lo = cdf((x - mean - 1.0 / 255.0) / np.exp(log_std))
  mass = np.where(x < -0.999, hi, np.where(x > 0.999, 1.0 - lo, hi - lo))
  return np.log(np.maximum(mass, 1e-12))


def ref_hybrid_loss(sched: RefSchedule, out, x0, t, noise):
  """{'mse', 'vb', 'loss'} (N,) for model output `out` (N, 2C) at x_t = q_sample(x0, t, noise)."""
  c = x0.shape[1]
  xt = sched.q_sample(x0, t, noise)
  mean, logvar, _ = sched.p_mean_logvar(out, xt, t)
  kl = ref_gaussian_kl(sched.posterior_mean(x0, xt, t), sched.posterior_log_var_clipped(t)[:, None], mean, logvar)
  nll = -ref_decoder_log_likelihood(x0, mean, 0.5 * logvar)
  vb = np.where(t == 0, nll.mean(1), kl.mean(1)) / np.log(2.0)
  mse = ((noise - out[:, :c]) ** 2).mean(1)
  return {"mse": mse, "vb": vb, "loss": mse + vb}


def ref_p_sample(sched: RefSchedule, out, xt, t, noise, temperature=1.0):
  mean, logvar, _ = sched.p_mean_logvar(out, xt, t)
  return mean + (t != 0)[:, None] * np.exp(0.5 * logvar) * noise * temperature
