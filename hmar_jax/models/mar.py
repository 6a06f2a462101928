"""MAR backbone (Li et al., "Autoregressive Image Generation without Vector Quantization"), Flax NNX.

Everything of the official models/mar.py except the diffusion head (hmar_jax/models/diffloss.py):
an MAE-style encoder / decoder over continuous tokens (B, L, token_embed_dim) of the KL-16 VAE,
returning the conditioning z (B, L, decoder_embed_dim) of the per-token diffusion head.

Official layout (written for NNX):

* tokens -> z_proj (Linear) -> prepend `buffer_size` buffer tokens, all set to the class embedding
  (class_emb row of the label, or the learned `fake_latent` when the label is dropped: with
  probability label_drop_prob in training, always for the unconditional half of CFG)
  -> + encoder_pos_embed_learned -> z_proj_ln (LayerNorm eps 1e-6) -> drop the masked tokens
  -> encoder blocks -> encoder_norm.
* decoder_embed (Linear) -> put the kept tokens back in place, a learned mask_token everywhere else
  -> + decoder_pos_embed_learned -> decoder blocks -> decoder_norm -> drop the buffer
  -> + diffusion_pos_embed_learned.
* Blocks are timm `Block`s: x + attn(norm1(x)), x + mlp(norm2(x)); fused qkv Linear with bias,
  head dim D / H, logit scale head_dim^-0.5; Mlp fc1 -> exact GELU -> fc2 with hidden int(D * 4).
  mar_base / mar_large / mar_huge pass norm_layer=partial(nn.LayerNorm, eps=1e-6), so every
  LayerNorm (blocks, encoder_norm, decoder_norm, z_proj_ln) has eps 1e-6.
* Dropout (training only): attention probabilities (attn_dropout), after the attention projection,
  after the MLP's GELU and after fc2 (proj_dropout), as timm's Attention / Mlp do.

Static shapes: the official encoder drops the masked tokens with boolean indexing (a length that
changes per batch). Here the kept tokens (buffer first, then the kept image tokens in sequence
order, as boolean indexing orders them) are gathered into a buffer of a static `capacity` given by
the caller; the padding rows are excluded as attention keys, so the kept tokens' outputs equal the
official ones, and the decoder gathers them back to their places. A row keeping more tokens than
`capacity` would lose tokens: `training_capacity(config)` is the bound for masks drawn with
`mask_ratio` (ratio >= mask_ratio_min), and `buffer_size + seq_len` always suffices.

Parameters carry logical axis names (see hmar_jax/models/blocks.py): 'embed' (model widths),
'heads' (the fused qkv outputs and the attention projection's input), 'mlp', 'classes', 'length',
'cvae' (token_embed_dim).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.models.blocks import block_list, partitioned, scan_block_list
from hmar_jax.models.dense_attention import (
  DEFAULT_IMPLEMENTATION,
  check_implementation,
  cudnn_unsupported,
  dense_attention,
  resolve_implementation,
)

# (encoder depth, width, heads) = decoder's, diffloss (depth, width) of the official evaluation
# commands (README: MAR-B --diffloss_d 6 --diffloss_w 1024, MAR-L 8 x 1280, MAR-H 12 x 1536).
VARIANTS = {
  "base": dict(width=768, depth=12, heads=12, diffloss_d=6, diffloss_w=1024),
  "large": dict(width=1024, depth=16, heads=16, diffloss_d=8, diffloss_w=1280),
  "huge": dict(width=1280, depth=20, heads=16, diffloss_d=12, diffloss_w=1536),
}
NORM_EPS = 1e-6  # mar_base / large / huge: norm_layer=partial(nn.LayerNorm, eps=1e-6); z_proj_ln eps=1e-6
POS_STD = 0.02  # class_emb, fake_latent, mask_token and the three position embeddings ~ N(0, 0.02)
# Truncated Gaussian of the training mask ratio: centred at 1 with std 0.25, cut at [mask_ratio_min, 1].
MASK_RATIO_STD = 0.25


def mar_config(variant: str = "large") -> ml_collections.ConfigDict:
  """The flat MAR model config (family 'mar') of an official variant, or 'tiny' for tests.

  'base' / 'large' / 'huge' are mar_base / mar_large / mar_huge with the official training
  arguments (img 256, KL-16 VAE with 16 channels, patch 1, buffer 64, label drop 0.1, dropout 0.1,
  mask_ratio_min 0.7, diffusion_batch_mul 4) and the diffloss size of the released checkpoints.
  'tiny': 2 + 2 blocks of width 64, 4 heads, 64x64 images (4 x 4 tokens), buffer 4, 10 classes.
  """
  if variant not in (*VARIANTS, "tiny"):
    raise ValueError(f"MAR variant must be one of {sorted((*VARIANTS, 'tiny'))}, got {variant!r}")
  c = ml_collections.ConfigDict()
  c.family = "mar"
  c.img_size = 256
  c.vae_stride = 16
  c.patch_size = 1
  c.vae_embed_dim = 16
  v = VARIANTS.get(variant, dict(width=64, depth=2, heads=4, diffloss_d=2, diffloss_w=64))
  c.encoder_embed_dim = c.decoder_embed_dim = v["width"]
  c.encoder_depth = c.decoder_depth = v["depth"]
  c.encoder_num_heads = c.decoder_num_heads = v["heads"]
  c.mlp_ratio = 4.0
  c.class_num = 1000
  c.buffer_size = 64
  c.label_drop_prob = 0.1
  c.attn_dropout = 0.1
  c.proj_dropout = 0.1
  c.mask_ratio_min = 0.7
  c.grad_checkpointing = False
  c.diffloss_d = v["diffloss_d"]
  c.diffloss_w = v["diffloss_w"]
  c.num_sampling_steps = "100"
  c.diffusion_batch_mul = 4
  c.dtype = "float32"
  c.attn_implementation = DEFAULT_IMPLEMENTATION  # hmar_jax/models/dense_attention.py: auto | xla | cudnn
  if variant == "tiny":
    c.img_size = 64
    c.class_num = 10
    c.buffer_size = 4
    c.num_sampling_steps = "10"
  return c


def seq_hw(config) -> tuple[int, int]:
  """(seq_h, seq_w) token grid: img_size // vae_stride // patch_size per side."""
  n = config.img_size // config.vae_stride // config.patch_size
  return n, n


def seq_len(config) -> int:
  h, w = seq_hw(config)
  return h * w


def token_embed_dim(config) -> int:
  return config.vae_embed_dim * config.patch_size**2


def attn_implementation(config) -> str:
  """The config's attention implementation (a stored config from before the field: the default)."""
  return check_implementation(config.get("attn_implementation", DEFAULT_IMPLEMENTATION))


def check_mar_config(config) -> None:
  """Raises one ValueError naming the first bad field of a MAR config."""
  for name in ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "encoder_embed_dim", "encoder_depth"):
    if int(config[name]) < 1:
      raise ValueError(f"MAR config: {name} must be >= 1, got {config[name]}")
  for name in ("decoder_embed_dim", "decoder_depth", "class_num", "buffer_size"):
    if int(config[name]) < 1:
      raise ValueError(f"MAR config: {name} must be >= 1, got {config[name]}")
  if config.img_size % (config.vae_stride * config.patch_size):
    raise ValueError(
      f"MAR config: img_size {config.img_size} is not a multiple of vae_stride * patch_size "
      f"({config.vae_stride} * {config.patch_size})"
    )
  for width, heads in (("encoder_embed_dim", "encoder_num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
    if int(config[heads]) < 1 or config[width] % config[heads]:
      raise ValueError(f"MAR config: {width} {config[width]} is not divisible by {heads} {config[heads]}")
  if not 0.0 < float(config.mask_ratio_min) <= 1.0:
    raise ValueError(f"MAR config: mask_ratio_min must be in (0, 1], got {config.mask_ratio_min}")
  for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
    if not 0.0 <= float(config[name]) < 1.0:
      raise ValueError(f"MAR config: {name} must be in [0, 1), got {config[name]}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"MAR config: dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  try:
    impl = attn_implementation(config)
  except ValueError as e:
    raise ValueError(f"MAR config: {e}") from None
  for width, heads in (("encoder_embed_dim", "encoder_num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
    why = cudnn_unsupported(config.dtype, config[width] // config[heads], dropout=False)
    if impl == "cudnn" and why:
      raise ValueError(f"MAR config: attn_implementation 'cudnn' cannot run the {width[:7]}: {why}")


def min_masked(seq_len_: int, mask_ratio_min: float) -> int:
  """ceil(seq_len * mask_ratio_min) in the float32 arithmetic of `num_masked_tokens`."""
  return int(np.ceil(np.float32(seq_len_) * np.float32(mask_ratio_min)))


def training_capacity(config) -> int:
  """Encoder capacity for masks drawn by `mask_ratio` + `random_mask` (ratio >= mask_ratio_min):
  buffer_size + seq_len - ceil(seq_len * mask_ratio_min) kept tokens at most."""
  n = seq_len(config)
  return config.buffer_size + n - min_masked(n, config.mask_ratio_min)


# ----------------------------------------------------------------------------- masking helpers


def sample_orders(key: jax.Array, batch: int, seq_len_: int) -> jax.Array:
  """(batch, seq_len) int32: one uniformly random permutation of range(seq_len) per row."""
  return jnp.argsort(jax.random.uniform(key, (batch, seq_len_)), axis=-1).astype(jnp.int32)


def mask_ratio(key: jax.Array, mask_ratio_min: float) -> jax.Array:
  """One training mask ratio () float32 ~ Normal(1, 0.25) truncated to [mask_ratio_min, 1]
  (scipy truncnorm((mask_ratio_min - 1) / 0.25, 0, loc=1, scale=0.25) of the official code)."""
  lo = np.float32(mask_ratio_min)
  if lo >= 1.0:
    return jnp.ones((), jnp.float32)
  x = jax.random.truncated_normal(key, (float(lo) - 1.0) / MASK_RATIO_STD, 0.0, (), jnp.float32)
  # rounding of 1 + 0.25 x may fall an ulp outside the interval; the capacity bound relies on >= lo.
  return jnp.clip(1.0 + MASK_RATIO_STD * x, lo, 1.0)


def num_masked_tokens(ratio: jax.Array, seq_len_: int) -> jax.Array:
  """() int32 ceil(seq_len * ratio), as the official random_masking (traced ratio allowed)."""
  return jnp.ceil(jnp.float32(seq_len_) * jnp.asarray(ratio, jnp.float32)).astype(jnp.int32)


def order_ranks(orders: jax.Array) -> jax.Array:
  """(B, L) int32: rank[b, orders[b, j]] = j (each position's place in its row's order)."""
  b, n = orders.shape
  ranks = jnp.zeros((b, n), jnp.int32)
  return ranks.at[jnp.arange(b)[:, None], orders].set(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)))


def mask_by_order(mask_len: jax.Array | int, orders: jax.Array) -> jax.Array:
  """(B, L) bool: True at the first `mask_len` positions of each row's order (official
  mask_by_order); mask_len () or (B,) may be traced."""
  mask_len = jnp.asarray(mask_len, jnp.int32)
  if mask_len.ndim == 1:
    mask_len = mask_len[:, None]
  return order_ranks(orders) < mask_len


def random_mask(orders: jax.Array, num_masked: jax.Array | int) -> jax.Array:
  """(B, L) float32, 1 = masked: the first `num_masked` positions of each row's order (official
  random_masking with a given count; exactly num_masked ones per row)."""
  return mask_by_order(num_masked, orders).astype(jnp.float32)


# ----------------------------------------------------------------------------- patchify


def patchify(latents: jax.Array, patch_size: int) -> jax.Array:
  """NHWC latents (B, h, w, C) -> tokens (B, h/p * w/p, C * p * p).

  Token channels in the official order ('nchpwq -> nhwcpq'): channel c * p * p + i * p + j holds
  latent channel c at row i, column j of the patch; tokens row-major over the patch grid.
  """
  b, h, w, c = latents.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size {p}")
  x = latents.reshape(b, h // p, p, w // p, p, c)
  x = jnp.einsum("nhpwqc->nhwcpq", x)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: jax.Array, patch_size: int, seq_h: int, seq_w: int) -> jax.Array:
  """Tokens (B, seq_h * seq_w, C * p * p) -> NHWC latents (B, seq_h * p, seq_w * p, C)."""
  b, n, d = tokens.shape
  p = patch_size
  if n != seq_h * seq_w or d % (p * p):
    raise ValueError(f"tokens of shape {tokens.shape} do not fit a {seq_h}x{seq_w} grid of {p}x{p} patches")
  c = d // (p * p)
  x = tokens.reshape(b, seq_h, seq_w, c, p, p)
  x = jnp.einsum("nhwcpq->nhpwqc", x)
  return x.reshape(b, seq_h * p, seq_w * p, c)


# ----------------------------------------------------------------------------- blocks


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _linear(din: int, dout: int, axes: tuple, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  # official _init_weights: xavier_uniform weights, zero biases.
  return nnx.Linear(
    din,
    dout,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(nnx.initializers.xavier_uniform(), axes),
    bias_init=partitioned(nnx.initializers.zeros_init(), axes[-1:]),
    rngs=rngs,
  )


def _layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    dim,
    epsilon=NORM_EPS,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
    bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
    rngs=rngs,
  )


class Attention(nnx.Module):
  """timm Attention: fused qkv Linear (D, 3D) with bias (outputs ordered (3, H, Dh), as the
  official reshape(B, N, 3, H, Dh)), softmax(q k^T / sqrt(Dh)) v, proj Linear.

  implementation: hmar_jax/models/dense_attention.py ('auto': cuDNN's fused attention on a GPU
  when this call has no attention dropout, else the XLA einsums)."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs, implementation: str = DEFAULT_IMPLEMENTATION):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.dtype = dtype
    self.implementation = check_implementation(implementation)
    self.qkv = _linear(dim, 3 * dim, ("embed", "heads"), dtype, rngs)
    self.proj = _linear(dim, dim, ("heads", "embed"), dtype, rngs)

  def __call__(self, x, kv_lengths, attn_drop: float, proj_drop: float, key) -> jax.Array:
    """x (B, N, D); kv_lengths (B,) int or None (all valid): row b attends to its first kv_lengths[b]
    positions only."""
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    k_attn, k_proj = (None, None) if key is None else jax.random.split(key)
    dropout = k_attn is not None and attn_drop > 0.0
    impl = resolve_implementation(self.implementation, dtype=q.dtype, head_dim=self.head_dim, dropout=dropout)
    out = dense_attention(
      q,
      k,
      v,
      kv_lengths=kv_lengths,
      implementation=impl,
      probs_dropout=(lambda p: _dropout(p, attn_drop, k_attn)) if dropout else None,
    ).reshape(b, n, d)
    return _dropout(self.proj(out), proj_drop, k_proj)


class Mlp(nnx.Module):
  """timm Mlp: fc1 -> exact GELU -> dropout -> fc2 -> dropout."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, ("embed", "mlp"), dtype, rngs)
    self.fc2 = _linear(hidden, dim, ("mlp", "embed"), dtype, rngs)

  def __call__(self, x, drop: float, key) -> jax.Array:
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    h = _dropout(jax.nn.gelu(self.fc1(x), approximate=False), drop, k1)
    return _dropout(self.fc2(h), drop, k2)


class Block(nnx.Module):
  """timm Block (pre-norm): x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    dtype,
    rngs: nnx.Rngs,
    attn_implementation: str = DEFAULT_IMPLEMENTATION,
  ):
    self.norm1 = _layer_norm(dim, dtype, rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs, implementation=attn_implementation)
    self.norm2 = _layer_norm(dim, dtype, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x, kv_lengths, attn_drop: float, proj_drop: float, key) -> jax.Array:
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    x = x + self.attn(self.norm1(x), kv_lengths, attn_drop, proj_drop, k1)
    return x + self.mlp(self.norm2(x), proj_drop, k2)


def _normal_param(key, shape, axes) -> nnx.Param:
  return nnx.Param(POS_STD * jax.random.normal(key, shape, jnp.float32), out_sharding=axes, eager_sharding=False)


# ----------------------------------------------------------------------------- backbone


class MARBackbone(nnx.Module):
  """The official MAR minus its DiffLoss: (tokens, mask, labels) -> z (B, L, decoder_embed_dim).

  Params (NNX path = official key, Linear kernels transposed): class_emb.embedding, fake_latent
  (1, E), z_proj, z_proj_ln, encoder_pos_embed_learned (1, buf + L, E), encoder_blocks[i].{norm1,
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, encoder_norm, decoder_embed, mask_token (1, 1, D),
  decoder_pos_embed_learned (1, buf + L, D), decoder_blocks[i], decoder_norm,
  diffusion_pos_embed_learned (1, L, D).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    check_mar_config(config)
    self.config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    c = self.config
    self.dtype = jnp.dtype(c.dtype)
    self.seq_h, self.seq_w = seq_hw(c)
    self.seq_len = self.seq_h * self.seq_w
    self.token_embed_dim = token_embed_dim(c)
    self.buffer_size = int(c.buffer_size)
    self.label_drop_prob = float(c.label_drop_prob)
    self.attn_dropout = float(c.attn_dropout)
    self.proj_dropout = float(c.proj_dropout)
    self.grad_checkpointing = bool(c.grad_checkpointing)
    e, d, n = c.encoder_embed_dim, c.decoder_embed_dim, self.seq_len + self.buffer_size
    attn_impl = attn_implementation(c)

    self.class_emb = nnx.Embed(
      c.class_num,
      e,
      param_dtype=jnp.float32,
      embedding_init=partitioned(nnx.initializers.normal(POS_STD), ("classes", "embed")),
      rngs=rngs,
    )
    self.fake_latent = _normal_param(rngs.params(), (1, e), (None, "embed"))
    self.z_proj = _linear(self.token_embed_dim, e, ("cvae", "embed"), self.dtype, rngs)
    self.z_proj_ln = _layer_norm(e, self.dtype, rngs)
    self.encoder_pos_embed_learned = _normal_param(rngs.params(), (1, n, e), (None, "length", "embed"))

    def blocks(dim, heads, depth):
      def make(r):
        return Block(dim, heads, c.mlp_ratio, dtype=self.dtype, rngs=r, attn_implementation=attn_impl)

      return block_list(make, depth, rngs)

    self.encoder_blocks = blocks(e, c.encoder_num_heads, c.encoder_depth)
    self.encoder_norm = _layer_norm(e, self.dtype, rngs)

    self.decoder_embed = _linear(e, d, ("embed", None), self.dtype, rngs)
    self.mask_token = _normal_param(rngs.params(), (1, 1, d), (None, None, "embed"))
    self.decoder_pos_embed_learned = _normal_param(rngs.params(), (1, n, d), (None, "length", "embed"))
    self.decoder_blocks = blocks(d, c.decoder_num_heads, c.decoder_depth)
    self.decoder_norm = _layer_norm(d, self.dtype, rngs)
    self.diffusion_pos_embed_learned = _normal_param(rngs.params(), (1, self.seq_len, d), (None, "length", "embed"))

  # --------------------------------------------------------------------------- pieces

  def class_embedding(self, labels: jax.Array | None, batch: int | None = None) -> jax.Array:
    """(B, E) float32 class_emb rows of `labels` (B,) int; labels None: the fake latent for `batch` rows."""
    if labels is None:
      return self.fake_embedding(batch)
    return self.class_emb(jnp.asarray(labels, jnp.int32)).astype(jnp.float32)

  def fake_embedding(self, batch: int) -> jax.Array:
    """(B, E) the learned fake_latent (CFG's unconditional class embedding) repeated."""
    return jnp.broadcast_to(self.fake_latent[...], (batch, self.fake_latent.shape[-1]))

  def patchify(self, latents: jax.Array) -> jax.Array:
    """NHWC latents (B, h, w, vae_embed_dim) -> tokens (B, L, token_embed_dim) (official order)."""
    return patchify(latents, self.config.patch_size)

  def unpatchify(self, tokens: jax.Array) -> jax.Array:
    """Tokens (B, L, token_embed_dim) -> NHWC latents (B, h, w, vae_embed_dim)."""
    return unpatchify(tokens, self.config.patch_size, self.seq_h, self.seq_w)

  def _run_blocks(self, blocks, x, kv_lengths, key):
    keys = None if key is None else jax.random.split(key, len(blocks))
    attn_drop = self.attn_dropout if key is not None else 0.0
    proj_drop = self.proj_dropout if key is not None else 0.0

    def apply(block, x, k):
      return block(x, kv_lengths, attn_drop, proj_drop, k)

    # one scan over the blocks (compiled once); grad_checkpointing recomputes each block's activations
    return scan_block_list(blocks, x, apply, keys, remat=self.grad_checkpointing)

  def __call__(
    self,
    tokens: jax.Array,
    mask: jax.Array,
    labels: jax.Array | None,
    *,
    key: jax.Array | None = None,
    capacity: int,
    drop_labels: jax.Array | bool | None = None,
  ) -> jax.Array:
    """z (B, L, decoder_embed_dim) float32 for the diffusion head (after diffusion_pos_embed).

    Args:
      tokens: (B, L, token_embed_dim) continuous tokens (masked places are ignored).
      mask: (B, L) float or bool, 1 / True = masked (dropped from the encoder).
      labels: (B,) int class labels, or None for the fake latent on every row.
      key: PRNG key for training (label drop with label_drop_prob, dropout); None = evaluation.
      capacity: static encoder length (buffer_size + the most image tokens any row keeps;
        `training_capacity(config)` for training masks, buffer_size + L always suffices).
      drop_labels: (B,) bool or a bool for all rows: rows given the fake latent instead of their
        class embedding (e.g. the unconditional CFG half); overrides the random drop of `key`.
    """
    b, n, cin = tokens.shape
    buf = self.buffer_size
    if (n, cin) != (self.seq_len, self.token_embed_dim):
      raise ValueError(f"tokens must be (B, {self.seq_len}, {self.token_embed_dim}), got {tokens.shape}")
    if tuple(mask.shape) != (b, n):
      raise ValueError(f"mask must be (B, L) = {(b, n)}, got {tuple(mask.shape)}")
    capacity = int(capacity)
    if not buf <= capacity <= buf + n:
      raise ValueError(f"capacity must be in [buffer_size, buffer_size + seq_len] = [{buf}, {buf + n}], got {capacity}")
    masked = jnp.asarray(mask).astype(bool)
    if not isinstance(masked, jax.core.Tracer):  # concrete: refuse a mask that would lose tokens
      most = int(jnp.max(n - jnp.sum(masked, axis=1)))
      if most > capacity - buf:
        raise ValueError(f"a row keeps {most} tokens but capacity {capacity} holds {capacity - buf} after the buffer")

    # class embedding, with the label dropped to the fake latent (random in training, or as given)
    cls = self.class_embedding(labels, b)
    if drop_labels is None and key is not None and self.label_drop_prob > 0:
      key, k_drop = jax.random.split(key)
      drop_labels = jax.random.uniform(k_drop, (b,)) < self.label_drop_prob
    if drop_labels is not None:
      drop = jnp.broadcast_to(jnp.asarray(drop_labels, bool), (b,))
      cls = jnp.where(drop[:, None], self.fake_embedding(b), cls)
    k_enc, k_dec = (None, None) if key is None else jax.random.split(key)

    # encoder: buffer of class embeddings + projected tokens, position embedding, LayerNorm
    x = self.z_proj(tokens.astype(self.dtype)).astype(jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls[:, None, :], (b, buf, cls.shape[-1])), x], axis=1)
    x = self.z_proj_ln(x + self.encoder_pos_embed_learned[...])
    # drop the masked tokens: gather the kept ones (buffer first, then in sequence order) into
    # `capacity` slots; slot j of row r is valid iff j < the row's kept count.
    masked_buf = jnp.concatenate([jnp.zeros((b, buf), bool), masked], axis=1)
    order = jnp.argsort(masked_buf.astype(jnp.int32), axis=1, stable=True)[:, :capacity]
    kept = jnp.minimum(jnp.sum(~masked_buf, axis=1), capacity).astype(jnp.int32)
    x = jnp.take_along_axis(x, order[:, :, None], axis=1)
    x = self._run_blocks(self.encoder_blocks, x, kept, k_enc)
    x = self.encoder_norm(x)

    # decoder: kept tokens back to their places, the mask token elsewhere
    x = self.decoder_embed(x).astype(jnp.float32)
    slot = jnp.cumsum(~masked_buf, axis=1) - 1  # each kept position's slot in the encoder buffer
    back = jnp.take_along_axis(x, jnp.clip(slot, 0, capacity - 1)[:, :, None], axis=1)
    mask_tok = self.mask_token[...].astype(jnp.float32)
    x = jnp.where(masked_buf[:, :, None], mask_tok, back)
    x = x + self.decoder_pos_embed_learned[...]
    x = self._run_blocks(self.decoder_blocks, x, None, k_dec)
    x = self.decoder_norm(x)
    return x[:, buf:].astype(jnp.float32) + self.diffusion_pos_embed_learned[...]


def count_params(module: nnx.Module) -> int:
  """Number of parameter elements of a (possibly abstract) module."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
