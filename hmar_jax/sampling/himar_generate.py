"""Class-conditional image sampling from a Hi-MAR (backbone + two heads) and its KL VAE.

The official two-stage loop (HiDream-ai/himar models/himar.py `sample_tokens`); S = cond_scale ** 2
low-resolution tokens, L high-resolution tokens, each stage with MAR's masking schedule
(hmar_jax/sampling/mar_sampler.py `mar_schedule`: cosine, at least one token left masked until the
last step) in its own random order per image:

* Stage 1: 4 * cond_scale steps over the S low-res tokens (`backbone.stage1`, every high-res slot
  masked); the tokens leaving the mask are sampled by the MLP head (`diffloss.sample`) from their
  z1, guided by re_cfg (rows [cond; uncond], the second half with the fake latent) with the step's
  scale of cfg_schedule over S. Each token's z1 of the step that predicted it (conditional rows) is
  recorded: small_z (B, S, D).
* Stage 2: num_iter steps over the L high-res tokens (`backbone.stage2` with pivots = small_z, the
  conditional small_z on both halves when guided); the DiT head (`cond_diffloss.sample`) samples all
  L tokens jointly from z2, the visible tokens given as known (keep = not masked, re-noised at every
  diffusion step), guided by cfg with the step's scale over L; every position still masked before
  the step takes the new sample (the official write-back; those that stay masked are ignored by the
  next step, so only the last sample of each token counts).
* The high-res tokens are unpatchified and decoded by the KL VAE: decode(tokens / latent_scale),
  mapped from [-1, 1] to [0, 1] and clipped (engine_mar.py).

The official sampler has one temperature, used by both heads (it scales each diffusion step's noise).

Static shapes: the schedules are computed on the host; the masks are `ranks < masked_before` with
the count a traced scalar; each stage-1 step gathers the z of its predicted tokens padded up to a
power of two (`bucket`; padding rows are sampled and dropped); the stage-1 encoder runs with the
capacity buffer + S, the stage-2 one with buffer + S + its visible tokens rounded up to a power of
two. So the stage-1 encoder compiles once, the MLP head once per bucket, the stage-2 encoder once per capacity, the DiT head and the decoder
once; the guidance scales, the temperature and the key are traced, so another cfg, re_cfg,
temperature or seed reuses every compiled program. Whether a stage is guided at all is the official
test `cfg != 1.0` (stage 2) / `re_cfg != 1.0` (stage 1), a static flag.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.models.mar import sample_orders
from hmar_jax.models.precast import precast_linears
from hmar_jax.sampling.mar_generate import DEFAULT_DECODE_CHUNK, check_class_labels, decode_tokens
from hmar_jax.sampling.mar_sampler import CFG_SCHEDULES, bucket, cfg_scale, mar_schedule

# Official defaults (main_himar.py: cfg 1.0, re_cfg 1.0, linear schedule, temperature 1.0). num_iter: the
# official evaluation value of Hi-MAR-B / L (4; Hi-MAR-H 12), not main_himar.py's default 64 (64 DiT runs of
# 250 diffusion steps each). Evaluation: cfg / re_cfg 2.5 / 2.7 (B), 3.5 / 3.5 (L), 3.2 / 5.5 (H).
DEFAULT_NUM_ITER = 4
DEFAULT_CFG = 1.0
DEFAULT_RE_CFG = 1.0
DEFAULT_CFG_SCHEDULE = "linear"
DEFAULT_TEMPERATURE = 1.0
STAGE1_STEPS_PER_SIDE = 4  # the official small_num_iter = cond_scale * 4


def _is_number(x) -> bool:
  return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def check_himar_sampling_options(
  *, num_iter: int, cfg: float, re_cfg: float, cfg_schedule: str, temperature: float, prefix: str = ""
) -> None:
  """Raises ValueError naming the first bad option (prefix '--' for command-line names).

  num_iter: integer >= 1 (stage-2 steps); cfg, re_cfg: finite, >= 1 (1 = no guidance of stage 2 /
  stage 1); cfg_schedule: 'linear' or 'constant' (both stages); temperature: finite, > 0 (both heads).
  """
  if isinstance(num_iter, bool) or not isinstance(num_iter, (int, np.integer)) or num_iter < 1:
    raise ValueError(f"{prefix}num_iter must be an integer >= 1, got {num_iter!r}")
  for name, value in (("cfg", cfg), ("re_cfg", re_cfg)):
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 1.0:
      raise ValueError(f"{prefix}{name} must be a number >= 1 for Hi-MAR (1 = no guidance), got {value!r}")
  if cfg_schedule not in CFG_SCHEDULES:
    raise ValueError(f"{prefix}cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
  if not _is_number(temperature) or not math.isfinite(float(temperature)) or float(temperature) <= 0.0:
    raise ValueError(f"{prefix}temperature must be > 0, got {temperature!r}")


def _ranks(orders: jax.Array) -> jax.Array:
  """(B, n) int32 place of each position in its row's order (the inverse permutation)."""
  return jnp.argsort(orders, axis=-1).astype(jnp.int32)


class HiMARSampler:
  """Samples images from a Hi-MAR model and the KL VAE whose latents it models.

  Args:
    model: anything with `backbone` (HiMARBackbone), `diffloss` (DiffLoss, stage 1) and
      `cond_diffloss` (DiTHead, stage 2), e.g. hmar_jax.models.himar_model.HiMARModel.
    vae: hmar_jax.tokenizer.kl_vae.KLVAE with embed_dim = the model's vae_embed_dim and a
      downsampling of the model's vae_stride.
    decode_chunk: images decoded at a time (`decode_tokens`: the decoder's memory grows with it); any
      batch size works.
  """

  def __init__(self, model, vae, *, decode_chunk: int = DEFAULT_DECODE_CHUNK):
    backbone = model.backbone
    config = backbone.config
    if vae.embed_dim != config.vae_embed_dim or vae.downsample_factor != config.vae_stride:
      raise ValueError(
        f"the KL VAE (embed_dim {vae.embed_dim}, stride {vae.downsample_factor}) does not match the Hi-MAR model "
        f"(vae_embed_dim {config.vae_embed_dim}, vae_stride {config.vae_stride})"
      )
    if decode_chunk < 1:
      raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
    head2 = model.cond_diffloss
    if head2.seq_len != backbone.high_len or head2.in_channels != backbone.token_embed_dim:
      raise ValueError(
        f"the stage-2 head models {head2.seq_len} tokens of {head2.in_channels} channels, the backbone "
        f"{backbone.high_len} of {backbone.token_embed_dim}"
      )
    self.num_classes = int(config.class_num)
    self.low_len = int(backbone.low_len)
    self.high_len = int(backbone.high_len)
    self.token_dim = int(backbone.token_embed_dim)
    self.cond_dim = int(backbone.cond_dim)
    self.width = int(config.decoder_embed_dim)
    self.buffer_size = int(backbone.buffer_size)
    self.stage1_iters = STAGE1_STEPS_PER_SIDE * int(config.cond_scale)
    self.patch_size = int(config.patch_size)
    self.seq_h, self.seq_w = int(backbone.seq_h), int(backbone.seq_w)
    self.decode_chunk = int(decode_chunk)
    # Linear weights in their compute dtype once, not cast again at every call (bit-identical)
    self._backbone_def, self._backbone_state = nnx.split(precast_linears(backbone))
    self._head1_def, self._head1_state = nnx.split(precast_linears(model.diffloss))
    self._head2_def, self._head2_state = nnx.split(precast_linears(head2))
    self._vae_def, self._vae_state = nnx.split(vae)
    # One jitted function each, kept for the sampler's life: the compiled programs are reused.
    self.stage1_jit = jax.jit(self._stage1_fn, static_argnames=("capacity", "guided"))
    self.head1_jit = jax.jit(self._head1_fn, static_argnames=("rows", "guided"))
    self.stage2_jit = jax.jit(self._stage2_fn, static_argnames=("capacity", "guided"))
    self.head2_jit = jax.jit(self._head2_fn, static_argnames=("guided",))
    self.decode_jit = jax.jit(self._decode_fn)

  def place(self, sharding) -> None:
    """Puts every weight (backbone, both heads, VAE) on `sharding` (e.g. replicated over a mesh)."""
    self._backbone_state = jax.device_put(self._backbone_state, sharding)
    self._head1_state = jax.device_put(self._head1_state, sharding)
    self._head2_state = jax.device_put(self._head2_state, sharding)
    self._vae_state = jax.device_put(self._vae_state, sharding)

  def compiled_counts(self) -> tuple[int, ...]:
    """How many programs each jitted piece holds (stage 1, MLP head, stage 2, DiT head, decoder)."""
    jits = (self.stage1_jit, self.head1_jit, self.stage2_jit, self.head2_jit, self.decode_jit)
    return tuple(f._cache_size() for f in jits)

  # ------------------------------------------------------------------ compiled pieces
  def _stage1_fn(self, state, low, ranks, masked_before, labels, drop, *, capacity, guided):
    """z1 (N, S, D) for low-res tokens (B, S, T) masked where ranks < masked_before (N = 2B if guided)."""
    backbone = nnx.merge(self._backbone_def, state)
    mask = ranks < masked_before
    if guided:
      low, mask = jnp.concatenate([low, low]), jnp.concatenate([mask, mask])
    return backbone.stage1(low, mask, labels, key=None, capacity=capacity, drop_labels=drop)

  def _head1_fn(self, state, z, orders, ranks, low, small_z, start, stop, key, temperature, scale, *, rows, guided):
    """Samples the low-res tokens at places [start, stop) of each order (stop - start <= rows) from
    their z (N, S, D); returns (low (B, S, T) with them written, small_z (B, S, D) with their z)."""
    b = orders.shape[0]
    place = start + jnp.arange(rows)
    idx = jnp.take(orders, jnp.clip(place, 0, self.low_len - 1), axis=1)  # (B, rows)
    idx_z = jnp.concatenate([idx, idx]) if guided else idx
    z_pred = jnp.take_along_axis(z, idx_z[:, :, None], axis=1).reshape(-1, z.shape[-1])
    head = nnx.merge(self._head1_def, state)
    # A Python 1.0 is DiffLoss.sample's unguided path; a traced scale always takes the guided one.
    sampled = head.sample(z_pred, key, temperature, scale if guided else 1.0)
    sampled = sampled[: b * rows].reshape(b, rows, -1).astype(jnp.float32)
    idx = jnp.where(place[None, :] < stop, idx, self.low_len)  # padding rows: out of range, dropped
    low = low.at[jnp.arange(b)[:, None], idx].set(sampled, mode="drop")
    predicted = (ranks >= start) & (ranks < stop)
    small_z = jnp.where(predicted[:, :, None], z[:b], small_z)
    return low, small_z

  def _stage2_fn(self, state, tokens, ranks, masked_before, labels, drop, pivots, *, capacity, guided):
    """z2 (N, L, D) for high-res tokens (B, L, T) masked where ranks < masked_before, pivots (B, S, D)."""
    backbone = nnx.merge(self._backbone_def, state)
    mask = ranks < masked_before
    if guided:  # the official small_z = cat([small_z[:B], small_z[:B]]): conditional pivots on both halves
      tokens, mask, pivots = (jnp.concatenate([a, a]) for a in (tokens, mask, pivots))
    return backbone.stage2(tokens, mask, labels, pivots=pivots, key=None, capacity=capacity, drop_labels=drop)

  def _head2_fn(self, state, z, tokens, ranks, masked_before, key, temperature, scale, *, guided):
    """Samples all L tokens with the DiT head (visible ones known) and writes every masked place."""
    mask = ranks < masked_before
    known, keep = tokens, ~mask
    if guided:
      known, keep = jnp.concatenate([known, known]), jnp.concatenate([keep, keep])
    head = nnx.merge(self._head2_def, state)
    out = head.sample(z, key, known=known, keep=keep, temperature=temperature, cfg=scale if guided else 1.0)
    return jnp.where(mask[:, :, None], out[: tokens.shape[0]].astype(jnp.float32), tokens)

  def _decode_fn(self, vae_state, tokens):
    return decode_tokens(
      nnx.merge(self._vae_def, vae_state), tokens, self.patch_size, self.seq_h, self.seq_w, self.decode_chunk
    )

  # ------------------------------------------------------------------ public API
  def check_labels(self, labels) -> None:
    """Raises ValueError unless labels is a (B,) integer array of class ids in [0, num_classes)."""
    check_class_labels(labels, self.num_classes, "Hi-MAR")

  def sample_stages(
    self,
    labels,
    key,
    *,
    num_iter: int = DEFAULT_NUM_ITER,
    cfg: float = DEFAULT_CFG,
    re_cfg: float = DEFAULT_RE_CFG,
    cfg_schedule: str = DEFAULT_CFG_SCHEDULE,
    temperature: float = DEFAULT_TEMPERATURE,
    orders: tuple | None = None,
  ) -> dict[str, jax.Array]:
    """Both stages for `labels` (B,); key: PRNG key or an int seed.

    Options as `check_himar_sampling_options` (checked, with the labels, before anything is
    compiled). orders: ((B, S), (B, L)) int permutations instead of random ones (tests).
    Returns {'low_res_tokens': (B, S, cond_dim), 'pivots': small_z (B, S, D), 'tokens': (B, L, T)}.
    """
    check_himar_sampling_options(
      num_iter=num_iter, cfg=cfg, re_cfg=re_cfg, cfg_schedule=cfg_schedule, temperature=temperature
    )
    self.check_labels(labels)
    if isinstance(key, (int, np.integer)):
      key = jax.random.key(int(key))
    labels = jnp.asarray(labels, jnp.int32)
    b, s, n, buf = int(labels.shape[0]), self.low_len, self.high_len, self.buffer_size
    k_orders, k_stage1, k_stage2 = jax.random.split(key, 3)
    if orders is None:
      k1, k2 = jax.random.split(k_orders)
      orders = (sample_orders(k1, b, s), sample_orders(k2, b, n))
    orders1, orders2 = (jnp.asarray(o, jnp.int32) for o in orders)
    if tuple(orders1.shape) != (b, s) or tuple(orders2.shape) != (b, n):
      raise ValueError(f"orders must be ((B, S), (B, L)) = {((b, s), (b, n))}, got {orders1.shape}, {orders2.shape}")
    ranks1, ranks2 = _ranks(orders1), _ranks(orders2)
    temp = np.float32(temperature)

    def halves(guided):  # labels / fake-latent flags of the rows: [cond; uncond] when guided
      drop = jnp.zeros((b,), bool)
      if not guided:
        return labels, drop
      return jnp.concatenate([labels, labels]), jnp.concatenate([drop, jnp.ones((b,), bool)])

    # Stage 1: the low-resolution tokens, MLP head, re_cfg.
    guided1 = float(re_cfg) != 1.0  # the official `not re_cfg == 1.0`
    labels1, drop1 = halves(guided1)
    low = jnp.zeros((b, s, self.cond_dim), jnp.float32)
    small_z = jnp.zeros((b, s, self.width), jnp.float32)
    for step in mar_schedule(self.stage1_iters, s):
      if step.num_pred == 0:  # the official step samples an empty set (more steps than tokens)
        continue
      masked = np.int32(step.masked_before)
      # One capacity for every stage-1 step: buffer + S tokens are few (128 officially), and each encoder
      # capacity would be one more compile of the whole backbone for a negligible saving.
      z = self.stage1_jit(self._backbone_state, low, ranks1, masked, labels1, drop1, capacity=buf + s, guided=guided1)
      scale = np.float32(cfg_scale(float(re_cfg), cfg_schedule, step.mask_len, s))
      low, small_z = self.head1_jit(
        self._head1_state,
        z,
        orders1,
        ranks1,
        low,
        small_z,
        np.int32(step.start),
        np.int32(step.stop),
        jax.random.fold_in(k_stage1, step.index),
        temp,
        scale,
        rows=bucket(step.num_pred, s),
        guided=guided1,
      )

    # Stage 2: the high-resolution tokens, DiT head over all of them, cfg.
    guided2 = float(cfg) != 1.0
    labels2, drop2 = halves(guided2)
    tokens = jnp.zeros((b, n, self.token_dim), jnp.float32)
    for step in mar_schedule(int(num_iter), n):
      if step.num_pred == 0:
        continue
      masked = np.int32(step.masked_before)
      capacity = buf + s + bucket(n - step.masked_before, n)
      z = self.stage2_jit(
        self._backbone_state, tokens, ranks2, masked, labels2, drop2, small_z, capacity=capacity, guided=guided2
      )
      scale = np.float32(cfg_scale(float(cfg), cfg_schedule, step.mask_len, n))
      tokens = self.head2_jit(
        self._head2_state,
        z,
        tokens,
        ranks2,
        masked,
        jax.random.fold_in(k_stage2, step.index),
        temp,
        scale,
        guided=guided2,
      )
    return {"low_res_tokens": low, "pivots": small_z, "tokens": tokens}

  def sample_tokens(self, labels, key, **kwargs) -> jax.Array:
    """High-res tokens (B, L, token_dim) float32; arguments as `sample_stages`."""
    return self.sample_stages(labels, key, **kwargs)["tokens"]

  def decode(self, tokens: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] from high-res tokens (B, L, token_dim)."""
    return self.decode_jit(self._vae_state, tokens)

  def sample(self, labels, key, **kwargs) -> jax.Array:
    """Images (B, H, W, 3) float32 in [0, 1] for `labels`; keyword arguments as `sample_stages`."""
    return self.decode(self.sample_tokens(labels, key, **kwargs))
