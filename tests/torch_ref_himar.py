"""A PyTorch re-statement of the official Hi-MAR transformer (HiDream-ai/himar models/himar.py), for tests.

Written from the definition (no timm, no heads): the scale-aware block (task modulation from a task
embedding through SiLU and a Linear, per-block per-task scale / shift of it, gated branches, LayerNorm
outputs scaled by 1 + scale), and both stages as the official data flow runs them: the whole
[buffer | S low-res | L high-res] sequence is embedded, the masked entries dropped by boolean indexing
(every row must keep the same number), the decoder fills mask tokens back in. Parameter names equal the
official state_dict keys. Evaluation mode (no dropout, no random label drop, no random pivot drop);
the training-time placeholder choice is given explicitly as `placeholder` (B, S) (1 = placeholder).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.torch_ref_mar import EPS, RefAttention, RefMlp


class RefHiBlock(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float, tasks: int = 2):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=EPS)
    self.attn = RefAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=EPS)
    self.mlp = RefMlp(dim, int(dim * mlp_ratio))
    self.adaLN_scale = nn.Parameter(torch.zeros(tasks, 1, 1, 4 * dim))
    self.adaLN_shift = nn.Parameter(torch.zeros(tasks, 1, 1, 4 * dim))

  def forward(self, x, ada, task: int):
    mod = ada * self.adaLN_scale[task] + self.adaLN_shift[task]  # (1, 1, 4D)
    s_attn, g_attn, s_mlp, g_mlp = mod.chunk(4, dim=-1)
    x = x + g_attn * self.attn(self.norm1(x) * (1 + s_attn))
    return x + g_mlp * self.mlp(self.norm2(x) * (1 + s_mlp))


class RefHiMAR(nn.Module):
  """Hi-MAR without its heads: `stage1` -> z1 (B, S, D), `stage2` -> z2 (B, L, D)."""

  def __init__(self, c):
    super().__init__()
    self.buf = c.buffer_size
    self.high = (c.img_size // c.vae_stride // c.patch_size) ** 2
    self.low = c.cond_scale**2
    n = self.low + self.high
    self.n = n
    e, d = c.encoder_embed_dim, c.decoder_embed_dim
    self.class_emb = nn.Embedding(c.class_num, e)
    self.fake_latent = nn.Parameter(torch.zeros(1, e))
    self.z_proj = nn.Linear(c.vae_embed_dim * c.patch_size**2, e)
    self.z_proj_ln = nn.LayerNorm(e, eps=EPS)
    self.cond_z_proj = nn.Linear(d, e)
    self.cond_tokens = nn.Parameter(torch.zeros(1, self.low, c.cond_dim))
    self.cond_proj = nn.Linear(c.cond_dim, e)
    self.mask_token = nn.Parameter(torch.zeros(1, 2 * n, e))
    self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, 2 * (n + self.buf), e))
    self.encoder_blocks = nn.ModuleList(
      [RefHiBlock(e, c.encoder_num_heads, c.mlp_ratio) for _ in range(c.encoder_depth)]
    )
    self.encoder_task_emb = nn.Embedding(2, e)
    self.encoder_blocks_ada = nn.Sequential(nn.SiLU(), nn.Linear(e, 4 * e))
    self.encoder_norm = nn.LayerNorm(e, eps=EPS)
    self.decoder_embed = nn.Linear(e, d)
    self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, 2 * (n + self.buf), d))
    self.decoder_blocks = nn.ModuleList(
      [RefHiBlock(d, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)]
    )
    self.decoder_task_emb = nn.Embedding(2, d)
    self.decoder_blocks_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 4 * d))
    self.decoder_norm = nn.LayerNorm(d, eps=EPS)
    self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))

  def randomize(self, seed: int) -> RefHiMAR:
    """Every parameter ~ N(0, 0.2) (LayerNorm scales and the modulation shifts around 1), so no weight
    is trivial and every scale / gate differs from its initial 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        around_one = ("norm" in name and "weight" in name) or "adaLN_shift" in name
        p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if around_one else 0.0))
    return self

  def _run(self, x, mask, cls, task):
    """x (B, N, E) slot contents, mask (B, N) 1 = masked; the official encoder + decoder of `task`."""
    b, _, e = x.shape
    buf, n = self.buf, self.n
    x = torch.cat([torch.zeros(b, buf, e, dtype=x.dtype), x], dim=1)
    keep = torch.cat([torch.zeros(b, buf, dtype=mask.dtype), mask], dim=1) == 0
    x[:, :buf] = cls[:, None, :]
    half = slice(0, buf + n) if task == 0 else slice(buf + n, 2 * (buf + n))
    x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, half])
    x = x[keep].reshape(b, -1, e)
    ada = self.encoder_blocks_ada(self.encoder_task_emb(torch.tensor([[task]])))
    for block in self.encoder_blocks:
      x = block(x, ada, task)
    x = self.decoder_embed(self.encoder_norm(x))
    rows = self.mask_token[:, :n] if task == 0 else self.mask_token[:, n:]
    full = torch.cat([torch.zeros(1, buf, x.shape[-1], dtype=x.dtype), rows], dim=1).repeat(b, 1, 1)
    full[keep] = x.reshape(-1, x.shape[-1])
    x = full + self.decoder_pos_embed_learned[:, half]
    ada = self.decoder_blocks_ada(self.decoder_task_emb(torch.tensor([[task]])))
    for block in self.decoder_blocks:
      x = block(x, ada, task)
    return self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned

  def _cls(self, labels, drop):
    cls = self.class_emb(labels)
    if drop is not None:
      cls = torch.where(drop[:, None], self.fake_latent.expand_as(cls), cls)
    return cls

  def stage1(self, low, high, low_mask, labels, drop=None):
    """low (B, S, cond_dim), high (B, L, T) (all masked), low_mask (B, S) 1 = masked -> z1 (B, S, D)."""
    x = torch.cat([self.cond_proj(low), self.z_proj(high)], dim=1)
    mask = torch.cat([low_mask, torch.ones(high.shape[:2], dtype=low_mask.dtype)], dim=1)
    return self._run(x, mask, self._cls(labels, drop), 0)[:, : self.low]

  def stage2(self, high, high_mask, labels, pivots=None, low=None, placeholder=None, drop=None):
    """high (B, L, T), high_mask (B, L); pivots (B, S, D) or low (B, S, cond_dim); placeholder (B, S)."""
    piv = self.cond_z_proj(pivots) if pivots is not None else self.cond_proj(low)
    if placeholder is not None:
      p = placeholder[:, :, None].to(piv.dtype)
      piv = p * self.cond_proj(self.cond_tokens) + (1 - p) * piv
    x = torch.cat([piv, self.z_proj(high)], dim=1)
    mask = torch.cat([torch.zeros(high.shape[0], self.low, dtype=high_mask.dtype), high_mask], dim=1)
    return self._run(x, mask, self._cls(labels, drop), 1)[:, self.low :]
