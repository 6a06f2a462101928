"""Hi-MAR transformer (Zheng et al., "Hierarchical Masked Autoregressive Models with Low-Resolution
Token Pivots"), Flax NNX: everything of the official models/himar.py except its two heads.

The heads: stage 1 predicts the low-resolution tokens with MAR's per-token MLP DiffLoss
(hmar_jax/models/diffloss.py; the official 'diffloss.*'), stage 2 the high-resolution tokens with the
global diffusion transformer ('cond_diffloss.*', hmar_jax/models/dit_head.py).

One MAE encoder / decoder, shared by both stages and run twice. With S = cond_scale ** 2 low-resolution
tokens (the KL-16 latents of the image resized to cond_scale * vae_stride pixels: 8 x 8 x 16 at 128 px),
L = (img_size / vae_stride / patch_size) ** 2 high-resolution tokens and N = S + L, both stages see the
sequence [buffer (buffer_size) | S low-res slots | L high-res slots]:

* Stage 1 (task 0): low-res slots hold cond_proj(low-res tokens), masked with MAR's truncated-normal
  ratio (mask_ratio_min); every high-res slot is masked. Encoder positions / mask tokens / decoder
  positions are the first halves of the official tables: encoder_pos_embed_learned[:, :buf + N],
  mask_token[:, :N], decoder_pos_embed_learned[:, :buf + N]. The decoder output (+ diffusion_pos_embed)
  of the S low-res slots conditions the MLP head: z1 (B, S, D).
* Stage 2 (task 1): low-res ("pivot") slots hold cond_z_proj(z1) (the stage-1 decoder features, not
  sampled latents) and are never masked; in training a slot takes the learned placeholder
  cond_proj(cond_tokens) where stage 1 saw its token, and a whole row takes the placeholder with
  probability 1 - step_stage2_rate * min(1, epoch / step_warmup) (`pivot_drop_prob`). High-res slots
  hold z_proj(tokens), masked with the MaskGIT cosine ratio cos(pi r / 2), r ~ U[0, 1) (`cos`; else a
  truncated normal on [0.38, 1]). Second halves of the tables; output z2 (B, L, D) for the global head.

Scale-aware blocks (official `Block`): a per-stack task embedding (2, D) -> SiLU -> Linear(D, 4D) gives
`ada`; each block keeps adaLN_scale / adaLN_shift (2, 1, 1, 4D) and forms c = ada * adaLN_scale[task]
+ adaLN_shift[task] = (scale_msa, gate_msa, scale_mlp, gate_mlp) (shift initialised to (0, 1, 0, 1));
x += gate_msa * attn(LN(x) * (1 + scale_msa)); x += gate_mlp * mlp(LN(x) * (1 + scale_mlp)). The
LayerNorms keep their affine parameters (eps 1e-6); attention / MLP are timm's, as in MAR (qkv bias).

Static shapes: as MAR's backbone, the encoder gathers the kept tokens (buffer first, then kept slots
in sequence order) into a buffer of a static `capacity` and excludes the padding as attention keys.
Stage 1 drops every high-res slot, so its encoder only ever sees buffer + low-res slots.

The official flags: two_diffloss, global_dm, diff_seqlen and cond_drop_prob are stored but read by no
code of the official model (it always builds both heads); head / ratio / gdm_d / gdm_w size the global
head (num_heads, mlp_ratio, depth, width); cos picks the stage-2 mask ratio; the official seq_len
argument (256) equals L at 256 px and is derived here.

Parameters carry logical axis names: 'embed', 'heads', 'mlp', 'classes', 'length', 'cvae' as MAR;
'adaln' for the 4D modulation outputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hmar_jax.models import mar
from hmar_jax.models.blocks import block_list, partitioned, scan_block_list
from hmar_jax.models.dense_attention import DEFAULT_IMPLEMENTATION
from hmar_jax.models.mar import POS_STD, Attention, Mlp, _layer_norm, _linear, _normal_param

# (width, depth, heads) of himar_base / large / huge (encoder = decoder), and the head sizes of the
# official evaluation commands (README: --diffloss_d/_w, --gdm_d/_w, --head; all use --ratio 4).
VARIANTS = {
  "base": dict(width=768, depth=12, heads=12, diffloss_d=6, diffloss_w=1024, gdm_d=6, gdm_w=512, head=8),
  "large": dict(width=1024, depth=16, heads=16, diffloss_d=8, diffloss_w=1280, gdm_d=8, gdm_w=512, head=8),
  "huge": dict(width=1280, depth=20, heads=16, diffloss_d=12, diffloss_w=1536, gdm_d=12, gdm_w=768, head=12),
}
TINY = dict(width=64, depth=2, heads=4, diffloss_d=2, diffloss_w=64, gdm_d=2, gdm_w=64, head=4)
NUM_TASKS = 2  # task 0: stage 1 (low resolution), task 1: stage 2 (high resolution)
# Lower end of the stage-2 truncated normal mask ratio when `cos` is off (official constant).
STAGE2_TRUNC_MIN = 0.38


def himar_config(variant: str = "large") -> ml_collections.ConfigDict:
  """The flat Hi-MAR model config (family 'himar'): MAR's fields plus the official Hi-MAR arguments.

  'base' / 'large' / 'huge': himar_base / large / huge with the official evaluation flags
  (--cond_scale 8 --cond_dim 16 --two_diffloss --global_dm --ratio 4 --cos and the per-variant
  --diffloss_d/_w, --gdm_d/_w, --head) and main_himar.py's training defaults (step_warmup 100,
  step_stage2_rate 0.25, diffusion_batch_mul 1, label drop / dropout 0.1, mask_ratio_min 0.7).
  'tiny' (tests): 2 + 2 blocks of width 64, 4 heads, 64 px images (4 x 4 tokens), cond_scale 2,
  buffer 4, 10 classes.
  """
  if variant not in (*VARIANTS, "tiny"):
    raise ValueError(f"Hi-MAR variant must be one of {sorted((*VARIANTS, 'tiny'))}, got {variant!r}")
  v = VARIANTS.get(variant, TINY)
  c = mar.mar_config("tiny" if variant == "tiny" else "base")
  c.family = "himar"
  c.encoder_embed_dim = c.decoder_embed_dim = v["width"]
  c.encoder_depth = c.decoder_depth = v["depth"]
  c.encoder_num_heads = c.decoder_num_heads = v["heads"]
  c.diffloss_d, c.diffloss_w = v["diffloss_d"], v["diffloss_w"]
  c.diffusion_batch_mul = 1
  c.cond_scale = 2 if variant == "tiny" else 8
  c.cond_dim = 16
  c.two_diffloss = True
  c.global_dm = True
  c.gdm_d, c.gdm_w, c.head = v["gdm_d"], v["gdm_w"], v["head"]
  c.ratio = 4
  c.cos = True
  c.step_warmup = 100
  c.step_stage2_rate = 0.25
  c.cond_drop_prob = 0.5
  c.diff_seqlen = False
  # Training: 0.4 x stage 1 + 0.6 x stage 2 (engine_mar.py weighs the model's 2.0 x loss1 and
  # 0.75 x loss2 by 64 / 320 and 256 / 320). The DiT head samples with 250 steps whatever
  # num_sampling_steps (the MLP head's) says (official GlobalDiffLoss).
  c.stage_loss_weights = (0.4, 0.6)
  c.gdm_num_sampling_steps = "250"
  return c


def check_himar_config(config) -> None:
  """Raises one ValueError naming the first bad field of a Hi-MAR config."""
  try:
    mar.check_mar_config(config)
  except ValueError as e:
    raise ValueError(str(e).replace("MAR config:", "Hi-MAR config:", 1)) from None
  if config.get("family", "himar") != "himar":
    raise ValueError(f"Hi-MAR config: family must be 'himar', got {config.family!r}")
  for name in ("cond_scale", "cond_dim", "step_warmup"):
    if int(config[name]) < 1:
      raise ValueError(f"Hi-MAR config: {name} must be >= 1, got {config[name]}")
  if config.encoder_embed_dim != config.decoder_embed_dim:
    raise ValueError(
      "Hi-MAR config: encoder_embed_dim and decoder_embed_dim must be equal (the official mask_token has the "
      f"encoder width and fills decoder slots), got {config.encoder_embed_dim} and {config.decoder_embed_dim}"
    )
  if config.cond_dim != mar.token_embed_dim(config):
    raise ValueError(
      f"Hi-MAR config: cond_dim {config.cond_dim} must equal vae_embed_dim * patch_size ** 2 = "
      f"{mar.token_embed_dim(config)} (the stage-1 head predicts low-resolution tokens of that width)"
    )
  if not 0.0 <= float(config.step_stage2_rate) <= 1.0:
    raise ValueError(f"Hi-MAR config: step_stage2_rate must be in [0, 1], got {config.step_stage2_rate}")


def low_res_len(config) -> int:
  """S = cond_scale ** 2 low-resolution tokens (pivots)."""
  return int(config.cond_scale) ** 2


def high_res_len(config) -> int:
  """L high-resolution tokens (the official seq_len argument)."""
  return mar.seq_len(config)


def stage1_training_capacity(config) -> int:
  """Stage-1 encoder capacity for masks of `stage1_training_mask`: buffer + S - ceil(S * mask_ratio_min)."""
  s = low_res_len(config)
  return config.buffer_size + s - mar.min_masked(s, config.mask_ratio_min)


def stage2_training_capacity(config) -> int:
  """Stage-2 encoder capacity for masks of `stage2_training_mask`: buffer + S + L - (fewest masked)
  (the cosine ratio masks at least one token, the truncated normal ceil(L * 0.38))."""
  n = high_res_len(config)
  fewest = 1 if config.cos else mar.min_masked(n, STAGE2_TRUNC_MIN)
  return config.buffer_size + low_res_len(config) + n - fewest


# ----------------------------------------------------------------------------- masking


def cosine_mask_ratio(key: jax.Array) -> jax.Array:
  """() float32 MaskGIT ratio cos(pi r / 2), r ~ U[0, 1) (official MaskRatioGenerator), clipped to
  [0, 1] (float32 pi / 2 exceeds pi / 2, so r near 1 could give a tiny negative cosine)."""
  r = jax.random.uniform(key, (), jnp.float32)
  return jnp.clip(jnp.cos(r * jnp.float32(math.pi * 0.5)), 0.0, 1.0)


def stage2_mask_ratio(key: jax.Array, config) -> jax.Array:
  """() float32 stage-2 training ratio: `cosine_mask_ratio` with `cos`, else truncated normal on [0.38, 1]."""
  return cosine_mask_ratio(key) if config.cos else mar.mask_ratio(key, STAGE2_TRUNC_MIN)


def stage1_training_mask(key: jax.Array, batch: int, config) -> jax.Array:
  """(B, S) float32, 1 = masked: ceil(S * ratio) low-res tokens per row, ratio ~ MAR's truncated
  normal on [mask_ratio_min, 1], each row in its own random order (official mode=True masking)."""
  s = low_res_len(config)
  k_order, k_ratio = jax.random.split(key)
  orders = mar.sample_orders(k_order, batch, s)
  return mar.random_mask(orders, mar.num_masked_tokens(mar.mask_ratio(k_ratio, config.mask_ratio_min), s))


def stage2_training_mask(key: jax.Array, batch: int, config) -> jax.Array:
  """(B, L) float32, 1 = masked: ceil(L * stage2_mask_ratio) high-res tokens per row (at least one: the
  official masked-mean loss would be 0 / 0 without), each row in its own random order (mode=False)."""
  n = high_res_len(config)
  k_order, k_ratio = jax.random.split(key)
  orders = mar.sample_orders(k_order, batch, n)
  count = jnp.clip(mar.num_masked_tokens(stage2_mask_ratio(k_ratio, config), n), 1, n)
  return mar.random_mask(orders, count)


def pivot_drop_prob(epoch, config) -> jax.Array:
  """() float32 probability that a training row's pivot slots all take the placeholder:
  1 - step_stage2_rate * min(1, epoch / step_warmup) (1 at epoch 0; epoch may be traced)."""
  e = jnp.asarray(epoch, jnp.float32)
  return 1.0 - jnp.float32(config.step_stage2_rate) * jnp.minimum(1.0, e / jnp.float32(config.step_warmup))


def pivot_placeholder(key: jax.Array, stage1_mask: jax.Array, epoch, config) -> jax.Array:
  """(B, S) bool, True = the pivot slot takes the learned placeholder (official training rule):
  where stage 1 saw the token (stage1_mask 0), and on whole rows drawn with `pivot_drop_prob`
  (u <= p, u ~ U[0, 1), as the official torch.rand(B) <= p)."""
  b = stage1_mask.shape[0]
  drop_row = jax.random.uniform(key, (b,)) <= pivot_drop_prob(epoch, config)
  return drop_row[:, None] | ~jnp.asarray(stage1_mask).astype(bool)


# ----------------------------------------------------------------------------- blocks


class Block(nnx.Module):
  """Official scale-aware Block: pre-norm timm block whose LayerNorm outputs are scaled by
  (1 + scale) and whose branches are gated, with (scale_msa, gate_msa, scale_mlp, gate_mlp) =
  ada * adaLN_scale[task] + adaLN_shift[task] (no shift on the normalised input)."""

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
    axes = (None, None, None, "adaln")
    self.adaLN_scale = nnx.Param(
      jnp.zeros((NUM_TASKS, 1, 1, 4 * dim), jnp.float32), out_sharding=axes, eager_sharding=False
    )
    shift = jnp.concatenate([jnp.zeros((dim,)), jnp.ones((dim,)), jnp.zeros((dim,)), jnp.ones((dim,))])
    shift = jnp.broadcast_to(shift.astype(jnp.float32), (NUM_TASKS, 1, 1, 4 * dim))
    self.adaLN_shift = nnx.Param(shift, out_sharding=axes, eager_sharding=False)

  def __call__(self, x, ada, task: int, kv_lengths, attn_drop: float, proj_drop: float, key) -> jax.Array:
    """x (B, N, D) float32; ada (4D,) float32 the stack's task modulation; task 0 / 1 (static);
    kv_lengths (B,) int or None: row b attends to its first kv_lengths[b] positions only."""
    c = ada * self.adaLN_scale[...][task, 0, 0] + self.adaLN_shift[...][task, 0, 0]
    scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(c, 4)
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    h = self.attn(self.norm1(x) * (1 + scale_msa), kv_lengths, attn_drop, proj_drop, k1)
    x = x + gate_msa * h.astype(jnp.float32)
    h = self.mlp(self.norm2(x) * (1 + scale_mlp), proj_drop, k2)
    return x + gate_mlp * h.astype(jnp.float32)


# ----------------------------------------------------------------------------- backbone


class HiMARBackbone(nnx.Module):
  """The official HiMAR minus 'diffloss' and 'cond_diffloss': `stage1` and `stage2` forward passes.

  Params (NNX path = official key, Linear kernels transposed; E = D the width, S, L, N = S + L, buf):
  class_emb.embedding (classes, E), fake_latent (1, E), z_proj (T -> E), z_proj_ln, cond_z_proj
  (D -> E), cond_tokens (1, S, cond_dim), cond_proj (cond_dim -> E), mask_token (1, 2N, E),
  encoder_pos_embed_learned (1, 2(buf + N), E), encoder_blocks[i].{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2, adaLN_scale, adaLN_shift}, encoder_task_emb.embedding (2, E), encoder_blocks_ada
  (E -> 4E; official 'encoder_blocks_ada.1'), encoder_norm, decoder_embed (E -> D),
  decoder_pos_embed_learned (1, 2(buf + N), D), decoder_blocks[i], decoder_task_emb.embedding (2, D),
  decoder_blocks_ada (D -> 4D), decoder_norm, diffusion_pos_embed_learned (1, N, D).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    check_himar_config(config)
    self.config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    c = self.config
    self.dtype = jnp.dtype(c.dtype)
    self.seq_h, self.seq_w = mar.seq_hw(c)
    self.high_len = self.seq_h * self.seq_w
    self.low_len = low_res_len(c)
    self.total_len = self.low_len + self.high_len
    self.token_embed_dim = mar.token_embed_dim(c)
    self.cond_dim = int(c.cond_dim)
    self.buffer_size = int(c.buffer_size)
    self.label_drop_prob = float(c.label_drop_prob)
    self.attn_dropout = float(c.attn_dropout)
    self.proj_dropout = float(c.proj_dropout)
    self.grad_checkpointing = bool(c.grad_checkpointing)
    e, d, n, buf = c.encoder_embed_dim, c.decoder_embed_dim, self.total_len, self.buffer_size

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
    self.cond_z_proj = _linear(d, e, ("embed", None), self.dtype, rngs)
    self.cond_tokens = _normal_param(rngs.params(), (1, self.low_len, self.cond_dim), (None, "length", "cvae"))
    self.cond_proj = _linear(self.cond_dim, e, ("cvae", "embed"), self.dtype, rngs)
    self.mask_token = _normal_param(rngs.params(), (1, 2 * n, e), (None, "length", "embed"))
    self.encoder_pos_embed_learned = _normal_param(rngs.params(), (1, 2 * (n + buf), e), (None, "length", "embed"))

    attn_impl = mar.attn_implementation(c)

    def blocks(dim, heads, depth):
      def make(r):
        return Block(dim, heads, c.mlp_ratio, dtype=self.dtype, rngs=r, attn_implementation=attn_impl)

      return block_list(make, depth, rngs)

    self.encoder_blocks = blocks(e, c.encoder_num_heads, c.encoder_depth)
    self.encoder_task_emb = self._task_embedding(e, rngs)
    self.encoder_blocks_ada = _linear(e, 4 * e, ("embed", "adaln"), self.dtype, rngs)
    self.encoder_norm = _layer_norm(e, self.dtype, rngs)

    self.decoder_embed = _linear(e, d, ("embed", None), self.dtype, rngs)
    self.decoder_pos_embed_learned = _normal_param(rngs.params(), (1, 2 * (n + buf), d), (None, "length", "embed"))
    self.decoder_blocks = blocks(d, c.decoder_num_heads, c.decoder_depth)
    self.decoder_task_emb = self._task_embedding(d, rngs)
    self.decoder_blocks_ada = _linear(d, 4 * d, ("embed", "adaln"), self.dtype, rngs)
    self.decoder_norm = _layer_norm(d, self.dtype, rngs)
    self.diffusion_pos_embed_learned = _normal_param(rngs.params(), (1, n, d), (None, "length", "embed"))

  @staticmethod
  def _task_embedding(dim: int, rngs: nnx.Rngs) -> nnx.Embed:
    # nn.Embedding's default init N(0, 1) (the official initialize_weights leaves it alone)
    return nnx.Embed(
      NUM_TASKS,
      dim,
      param_dtype=jnp.float32,
      embedding_init=partitioned(nnx.initializers.normal(1.0), (None, "embed")),
      rngs=rngs,
    )

  # --------------------------------------------------------------------------- pieces

  def class_embedding(self, labels: jax.Array | None, batch: int) -> jax.Array:
    """(B, E) float32 class_emb rows of `labels` (B,) int; None: the fake latent on every row."""
    if labels is None:
      return self.fake_embedding(batch)
    return self.class_emb(jnp.asarray(labels, jnp.int32)).astype(jnp.float32)

  def fake_embedding(self, batch: int) -> jax.Array:
    """(B, E) the learned fake_latent (CFG's unconditional class embedding) repeated."""
    return jnp.broadcast_to(self.fake_latent[...], (batch, self.fake_latent.shape[-1]))

  def patchify(self, latents: jax.Array) -> jax.Array:
    """NHWC latents (B, h, w, C) -> tokens (B, h/p * w/p, C p^2) in the official order (either resolution)."""
    return mar.patchify(latents, self.config.patch_size)

  def unpatchify(self, tokens: jax.Array) -> jax.Array:
    """High-res tokens (B, L, T) -> NHWC latents (B, h, w, vae_embed_dim)."""
    return mar.unpatchify(tokens, self.config.patch_size, self.seq_h, self.seq_w)

  def unpatchify_low_res(self, tokens: jax.Array) -> jax.Array:
    """Low-res tokens (B, S, cond_dim) -> NHWC latents (B, cond_scale, cond_scale, cond_dim)
    (official unpatchify_small, which reads them at patch size 1)."""
    return mar.unpatchify(tokens, 1, int(self.config.cond_scale), int(self.config.cond_scale))

  def task_modulation(self, stack: str, task: int) -> jax.Array:
    """(4D,) float32 Linear(SiLU(task_emb[task])) of the 'encoder' or 'decoder' stack."""
    emb = getattr(self, f"{stack}_task_emb").embedding[...][task]
    return getattr(self, f"{stack}_blocks_ada")(jax.nn.silu(emb).astype(self.dtype)).astype(jnp.float32)

  def placeholder_embedding(self) -> jax.Array:
    """(1, S, E) float32 cond_proj(cond_tokens): the learned pivot placeholder."""
    return self.cond_proj(self.cond_tokens[...].astype(self.dtype)).astype(jnp.float32)

  def pivot_embedding(
    self,
    batch: int,
    *,
    pivots: jax.Array | None = None,
    low_res_tokens: jax.Array | None = None,
    placeholder: jax.Array | None = None,
  ) -> jax.Array:
    """(B, S, E) float32 contents of the stage-2 pivot slots.

    pivots (B, S, D): stage-1 features -> cond_z_proj(pivots) (official small_z path); or
    low_res_tokens (B, S, cond_dim): known low-res tokens -> cond_proj(tokens) (official small_z None).
    placeholder (B, S) bool: slots replaced by `placeholder_embedding` (see `pivot_placeholder`).
    """
    if (pivots is None) == (low_res_tokens is None):
      raise ValueError("stage 2 needs exactly one of pivots (stage-1 features) or low_res_tokens")
    s = self.low_len
    if pivots is not None:
      want = (batch, s, self.config.decoder_embed_dim)
      if tuple(pivots.shape) != want:
        raise ValueError(f"pivots must be (B, S, D) = {want}, got {tuple(pivots.shape)}")
      x = self.cond_z_proj(pivots.astype(self.dtype)).astype(jnp.float32)
    else:
      want = (batch, s, self.cond_dim)
      if tuple(low_res_tokens.shape) != want:
        raise ValueError(f"low_res_tokens must be (B, S, cond_dim) = {want}, got {tuple(low_res_tokens.shape)}")
      x = self.cond_proj(low_res_tokens.astype(self.dtype)).astype(jnp.float32)
    if placeholder is None:
      return x
    if tuple(placeholder.shape) != (batch, s):
      raise ValueError(f"placeholder must be (B, S) = {(batch, s)}, got {tuple(placeholder.shape)}")
    return jnp.where(jnp.asarray(placeholder, bool)[:, :, None], self.placeholder_embedding(), x)

  def _run_blocks(self, blocks, x, ada, task: int, kv_lengths, key):
    keys = None if key is None else jax.random.split(key, len(blocks))
    attn_drop = self.attn_dropout if key is not None else 0.0
    proj_drop = self.proj_dropout if key is not None else 0.0

    def apply(block, x, k):
      return block(x, ada, task, kv_lengths, attn_drop, proj_drop, k)

    # one scan over the blocks (compiled once); grad_checkpointing recomputes each block's activations
    return scan_block_list(blocks, x, apply, keys, remat=self.grad_checkpointing)

  def _labels(self, labels, b, key, drop_labels):
    cls = self.class_embedding(labels, b)
    if drop_labels is None and key is not None and self.label_drop_prob > 0:
      key, k_drop = jax.random.split(key)
      drop_labels = jax.random.uniform(k_drop, (b,)) < self.label_drop_prob
    if drop_labels is not None:
      drop = jnp.broadcast_to(jnp.asarray(drop_labels, bool), (b,))
      cls = jnp.where(drop[:, None], self.fake_embedding(b), cls)
    return cls, key

  def _check_mask(self, masked, kept_slots: int, capacity: int, lo: int, hi: int) -> None:
    if not lo <= capacity <= hi:
      raise ValueError(f"capacity must be in [{lo}, {hi}], got {capacity}")
    if not isinstance(masked, jax.core.Tracer):  # concrete: refuse a mask that would lose tokens
      most = int(jnp.max(jnp.sum(~masked, axis=1))) + kept_slots
      if most > capacity:
        raise ValueError(f"a row keeps {most} tokens (buffer included) but capacity is {capacity}")

  def _encode(self, x, masked_buf, mask_tokens, task: int, capacity: int, key) -> jax.Array:
    """Encoder over the kept entries of x (B, M, E) (embedded, position-embedded and normalised;
    masked_buf (B, M) bool) gathered into `capacity` slots, then decoder_embed and the kept outputs
    put back in place, mask_tokens (1, M, D) at the masked ones: the decoder input (B, M, D) float32
    before its position embedding."""
    order = jnp.argsort(masked_buf.astype(jnp.int32), axis=1, stable=True)[:, :capacity]
    kept = jnp.minimum(jnp.sum(~masked_buf, axis=1), capacity).astype(jnp.int32)  # a prefix of the slots
    h = jnp.take_along_axis(x, order[:, :, None], axis=1)
    h = self._run_blocks(self.encoder_blocks, h, self.task_modulation("encoder", task), task, kept, key)
    h = self.encoder_norm(h)
    h = self.decoder_embed(h).astype(jnp.float32)
    slot = jnp.cumsum(~masked_buf, axis=1) - 1  # each kept position's slot in the encoder buffer
    back = jnp.take_along_axis(h, jnp.clip(slot, 0, capacity - 1)[:, :, None], axis=1)
    return jnp.where(masked_buf[:, :, None], mask_tokens.astype(jnp.float32), back)

  def _decode(self, y, pos, task: int, key) -> jax.Array:
    y = y + pos
    y = self._run_blocks(self.decoder_blocks, y, self.task_modulation("decoder", task), task, None, key)
    return self.decoder_norm(y).astype(jnp.float32)

  # --------------------------------------------------------------------------- stages

  def stage1(
    self,
    low_res_tokens: jax.Array,
    mask: jax.Array,
    labels: jax.Array | None,
    *,
    key: jax.Array | None = None,
    capacity: int,
    drop_labels: jax.Array | bool | None = None,
  ) -> jax.Array:
    """Stage 1 (task 0): z1 (B, S, D) float32 for the stage-1 MLP head and, as pivots, for stage 2.

    Args:
      low_res_tokens: (B, S, cond_dim) low-res tokens (patchified latents of the downsized image;
        masked places are ignored).
      mask: (B, S) float or bool, 1 / True = masked. Every high-res slot is masked (official mode=True).
      labels: (B,) int class labels, or None for the fake latent on every row.
      key: PRNG key for training (label drop, dropout); None = evaluation.
      capacity: static encoder length, in [buffer_size, buffer_size + S]
        (`stage1_training_capacity(config)` for training masks; buffer_size + S always suffices).
      drop_labels: (B,) bool or one bool: rows given the fake latent (overrides the random drop).
    Returns:
      z1 = decoder output of the S low-res slots + diffusion_pos_embed_learned[:, :S].
    """
    b = low_res_tokens.shape[0]
    s, n, buf = self.low_len, self.total_len, self.buffer_size
    if tuple(low_res_tokens.shape[1:]) != (s, self.cond_dim):
      raise ValueError(f"low_res_tokens must be (B, {s}, {self.cond_dim}), got {tuple(low_res_tokens.shape)}")
    if tuple(mask.shape) != (b, s):
      raise ValueError(f"mask must be (B, S) = {(b, s)}, got {tuple(mask.shape)}")
    masked = jnp.asarray(mask).astype(bool)
    capacity = int(capacity)
    self._check_mask(masked, buf, capacity, buf, buf + s)
    cls, key = self._labels(labels, b, key, drop_labels)
    k_enc, k_dec = (None, None) if key is None else jax.random.split(key)

    # encoder input: buffer | low-res slots (the high-res slots are all dropped, so left out here)
    x = self.cond_proj(low_res_tokens.astype(self.dtype)).astype(jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls[:, None, :], (b, buf, cls.shape[-1])), x], axis=1)
    x = self.z_proj_ln(x + self.encoder_pos_embed_learned[...][:, : buf + s]).astype(jnp.float32)
    masked_buf = jnp.concatenate([jnp.zeros((b, buf), bool), masked], axis=1)
    mask_tokens = jnp.concatenate([jnp.zeros((1, buf, self.mask_token.shape[-1])), self.mask_token[...][:, :s]], 1)
    y = self._encode(x, masked_buf, mask_tokens, 0, capacity, k_enc)
    # decoder input: the high-res slots all hold their stage-1 mask tokens
    rest = jnp.broadcast_to(self.mask_token[...][:, s:n], (b, n - s, y.shape[-1]))
    y = jnp.concatenate([y, rest], axis=1)
    y = self._decode(y, self.decoder_pos_embed_learned[...][:, : buf + n], 0, k_dec)
    return y[:, buf : buf + s] + self.diffusion_pos_embed_learned[...][:, :s]

  def stage2(
    self,
    tokens: jax.Array,
    mask: jax.Array,
    labels: jax.Array | None,
    *,
    pivots: jax.Array | None = None,
    low_res_tokens: jax.Array | None = None,
    placeholder: jax.Array | None = None,
    key: jax.Array | None = None,
    capacity: int,
    drop_labels: jax.Array | bool | None = None,
  ) -> jax.Array:
    """Stage 2 (task 1): z2 (B, L, D) float32 for the global head.

    Args:
      tokens: (B, L, token_embed_dim) high-res tokens (masked places are ignored).
      mask: (B, L) float or bool, 1 / True = masked; the pivot slots are never masked.
      labels: (B,) int class labels, or None for the fake latent on every row.
      pivots / low_res_tokens / placeholder: the pivot slots, see `pivot_embedding` (training:
        pivots = stop_gradient(z1), placeholder = `pivot_placeholder(...)`; sampling: pivots only).
      key: PRNG key for training (label drop, dropout); None = evaluation.
      capacity: static encoder length, in [buffer_size + S, buffer_size + S + L]
        (`stage2_training_capacity(config)` for training masks; buffer_size + S + L always suffices).
      drop_labels: (B,) bool or one bool: rows given the fake latent (overrides the random drop).
    Returns:
      z2 = decoder output of the L high-res slots + diffusion_pos_embed_learned[:, S:].
    """
    b = tokens.shape[0]
    s, n, buf = self.low_len, self.total_len, self.buffer_size
    if tuple(tokens.shape[1:]) != (self.high_len, self.token_embed_dim):
      raise ValueError(f"tokens must be (B, {self.high_len}, {self.token_embed_dim}), got {tuple(tokens.shape)}")
    if tuple(mask.shape) != (b, self.high_len):
      raise ValueError(f"mask must be (B, L) = {(b, self.high_len)}, got {tuple(mask.shape)}")
    masked = jnp.asarray(mask).astype(bool)
    capacity = int(capacity)
    self._check_mask(masked, buf + s, capacity, buf + s, buf + n)
    piv = self.pivot_embedding(b, pivots=pivots, low_res_tokens=low_res_tokens, placeholder=placeholder)
    cls, key = self._labels(labels, b, key, drop_labels)
    k_enc, k_dec = (None, None) if key is None else jax.random.split(key)

    x = jnp.concatenate([piv, self.z_proj(tokens.astype(self.dtype)).astype(jnp.float32)], axis=1)
    x = jnp.concatenate([jnp.broadcast_to(cls[:, None, :], (b, buf, cls.shape[-1])), x], axis=1)
    x = self.z_proj_ln(x + self.encoder_pos_embed_learned[...][:, buf + n :]).astype(jnp.float32)
    masked_buf = jnp.concatenate([jnp.zeros((b, buf + s), bool), masked], axis=1)
    mask_tokens = jnp.concatenate([jnp.zeros((1, buf, self.mask_token.shape[-1])), self.mask_token[...][:, n:]], 1)
    y = self._encode(x, masked_buf, mask_tokens, 1, capacity, k_enc)
    y = self._decode(y, self.decoder_pos_embed_learned[...][:, buf + n :], 1, k_dec)
    return y[:, buf + s :] + self.diffusion_pos_embed_learned[...][:, s:]


def count_params(module: nnx.Module) -> int:
  """Number of parameter elements of a (possibly abstract) module."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# Official training weights of the two heads' losses, loss = 0.4 * loss1 + 0.6 * loss2: engine_mar.py
# weighs (64 / 320) * loss1 + (256 / 320) * loss2, and HiMAR.forward returns (2.0 * loss1, 0.75 * loss2).
STAGE_LOSS_WEIGHTS = (0.4, 0.6)
