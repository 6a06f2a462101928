"""A PyTorch re-statement of the official MAR encoder / decoder (LTH14/mar models/mar.py), for tests.

Written from the definition (no timm): pre-norm blocks with a fused-qkv attention and a GELU MLP,
LayerNorm eps 1e-6 everywhere, buffer tokens holding the class embedding, and the masked tokens
dropped from the encoder by boolean indexing, as the official forward_mae_encoder does (every row
must keep the same number of tokens). Parameter names equal the official state_dict keys. Evaluation
mode only (no dropout, no random label drop).
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS = 1e-6


class RefAttention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    dh = d // self.heads
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class RefMlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))


class RefBlock(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=EPS)
    self.attn = RefAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=EPS)
    self.mlp = RefMlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class RefMAR(nn.Module):
  """MAR without its diffusion head; `forward` returns z (B, L, D)."""

  def __init__(self, c):
    super().__init__()
    self.buffer_size = c.buffer_size
    self.seq_len = (c.img_size // c.vae_stride // c.patch_size) ** 2
    e, d = c.encoder_embed_dim, c.decoder_embed_dim
    n = self.seq_len + self.buffer_size
    self.class_emb = nn.Embedding(c.class_num, e)
    self.fake_latent = nn.Parameter(torch.zeros(1, e))
    self.z_proj = nn.Linear(c.vae_embed_dim * c.patch_size**2, e)
    self.z_proj_ln = nn.LayerNorm(e, eps=EPS)
    self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, e))
    self.encoder_blocks = nn.ModuleList([RefBlock(e, c.encoder_num_heads, c.mlp_ratio) for _ in range(c.encoder_depth)])
    self.encoder_norm = nn.LayerNorm(e, eps=EPS)
    self.decoder_embed = nn.Linear(e, d)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
    self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))
    self.decoder_blocks = nn.ModuleList([RefBlock(d, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)])
    self.decoder_norm = nn.LayerNorm(d, eps=EPS)
    self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, d))

  def randomize(self, seed: int) -> RefMAR:
    """Every parameter ~ N(0, 0.2) (LayerNorm scales around 1), so no weight is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name and "weight" in name else 0.0))
    return self

  def encoder(self, x, mask, class_embedding):
    x = self.z_proj(x)
    b, _, e = x.shape
    buf = torch.zeros(b, self.buffer_size, e, dtype=x.dtype)
    x = torch.cat([buf + class_embedding[:, None, :], x], dim=1)
    mask_with_buffer = torch.cat([torch.zeros(b, self.buffer_size, dtype=mask.dtype), mask], dim=1)
    x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
    x = x[(1 - mask_with_buffer).nonzero(as_tuple=True)].reshape(b, -1, e)  # drop the masked tokens
    for block in self.encoder_blocks:
      x = block(x)
    return self.encoder_norm(x)

  def decoder(self, x, mask):
    x = self.decoder_embed(x)
    b = x.shape[0]
    mask_with_buffer = torch.cat([torch.zeros(b, self.buffer_size, dtype=mask.dtype), mask], dim=1)
    full = self.mask_token.repeat(b, mask_with_buffer.shape[1], 1).clone()
    full[(1 - mask_with_buffer).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    x = full + self.decoder_pos_embed_learned
    for block in self.decoder_blocks:
      x = block(x)
    x = self.decoder_norm(x)[:, self.buffer_size :]
    return x + self.diffusion_pos_embed_learned

  def forward(self, tokens, mask, labels, drop=None):
    """tokens (B, L, T), mask (B, L) float 1 = masked, labels (B,) long; drop (B,) bool -> fake latent."""
    cls = self.class_emb(labels)
    if drop is not None:
      cls = torch.where(drop[:, None], self.fake_latent.expand_as(cls), cls)
    return self.decoder(self.encoder(tokens, mask, cls), mask)
