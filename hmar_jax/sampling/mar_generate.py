"""Class-conditional image sampling from a MAR (backbone + diffusion head) and its KL VAE.

`MARSampler` offers the interface of the HMAR `Sampler` that hmar_jax/sampling/at_scale.py and
hmar_jax/sample.py use (`place`, `sample`): the official masked generation loop
(hmar_jax/sampling/mar_sampler.py `sample_tokens`, the official models/mar.py `sample_tokens`)
draws the tokens, then the KL VAE decodes them as engine_mar.py does: decode(tokens / latent_scale),
mapped from [-1, 1] to [0, 1] and clipped.

Compilation: the backbone compiles once per encoder capacity and the head once per bucketed batch
of predicted tokens (both depend only on num_iter, the batch size and the token count); the
guidance scale, the temperature and the key are traced arguments, so another cfg, temperature or
seed reuses every compiled program. Whether guidance runs at all is the official test `cfg != 1.0`
on the run's cfg, a static flag: with it, every step takes the guided head path (the per-step
scale of either schedule is then never exactly 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.models.mar import unpatchify
from hmar_jax.models.precast import precast_linears
from hmar_jax.sampling.mar_sampler import CFG_SCHEDULES, sample_tokens

# Official defaults (main_mar.py); evaluation uses num_iter 256, cfg_schedule 'linear', temperature 1.0
# and cfg 2.9 / 3.0 / 3.2 for MAR-B / L / H (cfg 1.0 with temperature 0.95 without guidance).
DEFAULT_NUM_ITER = 64
DEFAULT_CFG = 1.0
DEFAULT_CFG_SCHEDULE = "linear"
DEFAULT_TEMPERATURE = 1.0


def check_mar_sampling_options(
  *, num_iter: int, cfg: float, cfg_schedule: str, temperature: float, prefix: str = ""
) -> None:
  """Raises ValueError naming the first bad option (prefix '--' for command-line names).

  num_iter: integer >= 1; cfg: finite, >= 1 (1 = no guidance: unlike HMAR's cfg, where 0 is
  none, a MAR cfg below 1 would push every token towards the unconditional model); cfg_schedule:
  'linear' or 'constant'; temperature: finite, > 0.
  """
  if isinstance(num_iter, bool) or not isinstance(num_iter, (int, np.integer)) or num_iter < 1:
    raise ValueError(f"{prefix}num_iter must be an integer >= 1, got {num_iter!r}")
  if not math.isfinite(float(cfg)) or float(cfg) < 1.0:
    raise ValueError(f"{prefix}cfg must be >= 1 for MAR (1 = no guidance; official 2.9 to 3.2), got {cfg!r}")
  if cfg_schedule not in CFG_SCHEDULES:
    raise ValueError(f"{prefix}cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
  if not math.isfinite(float(temperature)) or float(temperature) <= 0.0:
    raise ValueError(f"{prefix}temperature must be > 0, got {temperature!r}")


def check_class_labels(labels, num_classes: int, family: str) -> None:
  """Raises ValueError unless labels is a (B,) integer array of class ids in [0, num_classes)
  (the MAR family has no unconditional class id)."""
  host = np.asarray(labels)
  if host.ndim != 1 or not len(host):
    raise ValueError(f"labels must be a non-empty (B,) array, got shape {host.shape}")
  if not np.issubdtype(host.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {host.dtype}")
  bad = sorted({int(c) for c in host if not 0 <= c < num_classes})
  if bad:
    raise ValueError(f"class ids {bad[:10]} outside [0, {num_classes}) ({family} has no unconditional class id)")


def decode_tokens(vae, tokens: jax.Array, patch_size: int, seq_h: int, seq_w: int, chunk: int) -> jax.Array:
  """Images (B, H, W, 3) in [0, 1] from tokens (B, L, token_dim): the official decode(tokens / scale),
  `chunk` images at a time (the last chunk padded with zero tokens, whose images are dropped).

  Each image is decoded on its own (no op of the decoder mixes images), so the chunk changes no pixel;
  it bounds the decoder's full-resolution float32 activations (about 3 maps of chunk x H x W x ch x 4
  bytes live at once)."""

  def decode(t):
    latents = unpatchify(t, patch_size, seq_h, seq_w)
    return jnp.clip((vae.decode_latents(latents).astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)

  b = tokens.shape[0]
  if b <= chunk:
    return decode(tokens)
  n = -(-b // chunk)
  padded = jnp.pad(tokens, ((0, n * chunk - b), (0, 0), (0, 0)))
  images = jax.lax.map(decode, padded.reshape(n, chunk, *tokens.shape[1:]))  # one chunk at a time
  return images.reshape(n * chunk, *images.shape[2:])[:b]


# Images per decoder call: the float32 KL-16 decoder holds about 3 maps of 256 x 256 x 128 floats per image
# (0.1 GiB as XLA's CPU buffer assignment counts it; GPU float32 convolutions add workspaces on top), so 4
# images keep the decode far below the backbone's working memory at batch 64; decoding is ~1% of the time.
DEFAULT_DECODE_CHUNK = 4


class MARSampler:
  """Samples images from a MARModel and the KL VAE whose latents it models.

  Args:
    model: hmar_jax.models.mar_model.MARModel.
    vae: hmar_jax.tokenizer.kl_vae.KLVAE with embed_dim = the model's vae_embed_dim and a
      downsampling of the model's vae_stride.
    decode_chunk: images decoded at a time (the decoder's full-resolution activations grow with it;
      `decode_tokens`); any batch size works (the last chunk is padded).
  """

  def __init__(self, model, vae, *, decode_chunk: int = DEFAULT_DECODE_CHUNK):
    config = model.backbone.config
    if vae.embed_dim != config.vae_embed_dim or vae.downsample_factor != config.vae_stride:
      raise ValueError(
        f"the KL VAE (embed_dim {vae.embed_dim}, stride {vae.downsample_factor}) does not match the MAR model "
        f"(vae_embed_dim {config.vae_embed_dim}, vae_stride {config.vae_stride})"
      )
    if decode_chunk < 1:
      raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
    self.num_classes = int(model.num_classes)
    self.seq_len = int(model.seq_len)
    self.token_dim = int(model.token_dim)
    self.buffer_size = int(model.backbone.buffer_size)
    self.patch_size = int(config.patch_size)
    self.seq_h, self.seq_w = int(model.backbone.seq_h), int(model.backbone.seq_w)
    self.decode_chunk = int(decode_chunk)
    # Linear weights in their compute dtype once, not cast again at every call (bit-identical)
    self._backbone_def, self._backbone_state = nnx.split(precast_linears(model.backbone))
    self._head_def, self._head_state = nnx.split(precast_linears(model.diffloss))
    self._vae_def, self._vae_state = nnx.split(vae)
    # One jitted function each, kept for the sampler's life: the compiled programs are reused.
    self.backbone_jit = jax.jit(self._backbone_fn, static_argnames=("capacity",))
    self.head_jit = jax.jit(self._head_fn, static_argnames=("guided",))
    self.decode_jit = jax.jit(self._decode_fn)

  def place(self, sharding) -> None:
    """Puts the backbone's, the head's and the VAE's weights on `sharding` (e.g. replicated over
    a mesh of the local devices, so that a batch split over that mesh is sampled on all of them)."""
    self._backbone_state = jax.device_put(self._backbone_state, sharding)
    self._head_state = jax.device_put(self._head_state, sharding)
    self._vae_state = jax.device_put(self._vae_state, sharding)

  # ------------------------------------------------------------------ compiled pieces
  def _backbone_fn(self, state, tokens, mask, labels, drop, *, capacity):
    backbone = nnx.merge(self._backbone_def, state)
    return backbone(tokens, mask, labels, key=None, capacity=capacity, drop_labels=drop)

  def _head_fn(self, state, z, key, temperature, cfg, *, guided):
    head = nnx.merge(self._head_def, state)
    # A Python 1.0 is DiffLoss.sample's unguided path; a traced scale always takes the guided one.
    return head.sample(z, key, temperature, cfg if guided else 1.0)

  def _decode_fn(self, vae_state, tokens):
    return decode_tokens(
      nnx.merge(self._vae_def, vae_state), tokens, self.patch_size, self.seq_h, self.seq_w, self.decode_chunk
    )

  # ------------------------------------------------------------------ public API
  def check_labels(self, labels) -> None:
    """Raises ValueError unless labels is a (B,) integer array of class ids in [0, num_classes)."""
    check_class_labels(labels, self.num_classes, "MAR")

  def sample_tokens(
    self,
    labels,
    key,
    *,
    num_iter: int = DEFAULT_NUM_ITER,
    cfg: float = DEFAULT_CFG,
    cfg_schedule: str = DEFAULT_CFG_SCHEDULE,
    temperature: float = DEFAULT_TEMPERATURE,
  ) -> jax.Array:
    """Tokens (B, L, token_dim) float32 for `labels` (B,) with the official loop.

    key: PRNG key or an int seed. Options as `check_mar_sampling_options` (checked, with the
    labels, before anything is compiled).
    """
    check_mar_sampling_options(num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature)
    self.check_labels(labels)
    if isinstance(key, (int, np.integer)):
      key = jax.random.key(int(key))
    guided = float(cfg) != 1.0  # the official `not cfg == 1.0`
    temp = np.float32(temperature)

    def backbone_fn(tokens, mask, labels, drop, num_visible):
      return self.backbone_jit(
        self._backbone_state, tokens, mask, labels, drop, capacity=self.buffer_size + num_visible
      )

    def head_fn(z, k, _temperature, scale):
      return self.head_jit(self._head_state, z, k, temp, np.float32(scale), guided=guided)

    return sample_tokens(
      backbone_fn,
      head_fn,
      jnp.asarray(labels, jnp.int32),
      key,
      num_iter=int(num_iter),
      cfg=float(cfg),
      cfg_schedule=cfg_schedule,
      temperature=float(temperature),
      seq_len=self.seq_len,
      token_dim=self.token_dim,
    )

  def decode(self, tokens: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] from tokens (B, L, token_dim)."""
    return self.decode_jit(self._vae_state, tokens)

  def sample(self, labels, key, **kwargs) -> jax.Array:
    """Images (B, H, W, 3) float32 in [0, 1] for `labels`; keyword arguments as `sample_tokens`."""
    return self.decode(self.sample_tokens(labels, key, **kwargs))
