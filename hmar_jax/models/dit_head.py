"""Hi-MAR's stage-2 diffusion-transformer head (HiDream-ai/himar GlobalDiffLoss, models/models.py DiT), NNX.

Where MAR's DiffLoss denoises each token alone, Hi-MAR's second stage denoises all G x G tokens of
an image together (G = 16 for 256 px, L = G * G = 256) with a small DiT over full attention,
conditioned per token on the MAR decoder's features z (B, L, Cz). The official evaluation commands
use (--gdm_d, --gdm_w, --head, --ratio): B 6 x 512, 8 heads; L 8 x 512, 8 heads; H 12 x 768,
12 heads; mlp_ratio 4 for all three.

The network, `DiT(x_t (B, L, C), t (B,) original timesteps, z (B, L, Cz)) -> eps (B, L, C)`:

  h = x_embedder(x_t) + pos_embed         x_embedder: the official PatchEmbed with patch 1 (a 1x1
                                          conv), i.e. a Linear C -> W; pos_embed the fixed 2-D sin-cos
                                          table (`sincos_pos_embed_2d`), not a learned parameter
  c = t_embedder(t)[:, None] + c_embedder(z)   per token (B, L, W); c_embedder another 1x1 PatchEmbed
                                          (Cz -> W). No class embedding (the official LabelEmbedder is
                                          commented out; the labels passed in are unused) and no
                                          position table on z (the official c_pos_embed buffer stays
                                          zero and is not added)
  depth x block:  (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = ada_lin(SiLU(c))
                  h += gate_msa * attn(LN(h) * (1 + scale_msa) + shift_msa)
                  h += gate_mlp * mlp(LN(h) * (1 + scale_mlp) + shift_mlp)
                  LN without affine, eps 1e-6; attn: fused qkv Linear with bias (outputs ordered
                  (3, H, Dh)), softmax(q k^T / sqrt(Dh)) v over all L tokens, proj Linear;
                  mlp: fc1 -> tanh-GELU -> fc2, hidden int(W * mlp_ratio)
  final_layer:    (shift, scale) = ada_lin(SiLU(c)); linear(LN(h) * (1 + scale) + shift) -> C

Official init (initialize_weights): xavier-uniform Linear / x_embedder kernels with zero biases,
normal(0.02) time-MLP kernels, zeros for every ada_lin and for the final linear (a fresh head
outputs 0); c_embedder keeps PyTorch's default Conv2d init (uniform +-1/sqrt(fan_in), bias too).

The diffusion (official create_diffusion(..., learn_sigma=False)): cosine schedule of 1000 steps,
epsilon prediction, FIXED_LARGE variance (log of [posterior_variance[1], betas[1:]] of the
respaced process; the network outputs C channels, no variance) and the plain MSE loss (no
variational-bound term). hmar_jax/models/diffusion.py implements only the learned-range variance,
so the fixed-large reverse step is written here (`p_sample_fixed_large`).

`DiTHead.loss`: t ~ U{0..999} per image, noise per element, ALL L tokens noised to level t (known
tokens too: the network sees no clean tokens in training); per image the mean over L x C of
((noise - eps) * mask)^2 — the official mean_flat of the masked error, i.e. divided by L x C, not
by the number of masked tokens — then the mean over the batch. mask is 1 where the token is to be
predicted. (The official wrapper repeats the batch diffusion_batch_mul times before calling it.)

`DiTHead.sample`: the official sampler always respaces to 250 steps (GlobalDiffLoss hard-codes
timestep_respacing='250' whatever --num_sampling_steps says). Known tokens are replaced before EVERY
reverse step, RePaint-style: x_t <- where(keep, q_sample(known, t, x_T), x_t), re-noised to that
step's level with the SAME initial noise x_T each time (not fresh noise); the output of the last
step (t = 0) is not replaced, so known positions come back as the network's reconstruction of
them (the official caller only reads the unknown positions). Temperature scales only the noise
added by each reverse step (x_T is a plain standard normal). Classifier-free guidance as MAR's:
z = [cond; uncond] (N = 2B), x_T is one (B, L, C) draw used for both halves, the network runs on the
first half's x_t under both conditions, eps = uncond + cfg (cond - uncond) goes to both halves;
the per-step noise is drawn for all N rows. In Hi-MAR the stage-2 head is guided by --cfg (with the
linear schedule 1 + (cfg - 1) (L - mask_len) / L, computed by the caller); --re_cfg guides only
stage 1's MLP head.

Random draws (jit-friendly, explicit keys): `loss`: k_t, k_noise = split(key); `sample`:
k_init, k_loop = split(key), x_T from k_init, step i (t = T-1-i) from diffusion.step_keys(k_loop, T)[i].

Parameters carry logical axis names (hmar_jax/models/blocks.py): 'embed' (the width W), 'heads'
(fused qkv outputs, the attention projection's input), 'mlp', 'adaln' (modulation outputs), 'cvae'
(the token channels C); the condition width Cz and the 256 time frequencies are unnamed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.models import diffusion as gd
from hmar_jax.models.blocks import block_list, layer_norm, partitioned
from hmar_jax.models.dense_attention import (
  DEFAULT_IMPLEMENTATION,
  check_implementation,
  dense_attention,
  resolve_implementation,
)
from hmar_jax.models.diffloss import timestep_embedding
from hmar_jax.models.precast import precast_linears
from hmar_jax.parallel.partitioning import constrain

FREQUENCY_DIM = 256
NOISE_SCHEDULE = "cosine"
LN_EPS = 1e-6
SAMPLING_STEPS = "250"  # official GlobalDiffLoss: create_diffusion(timestep_respacing="250", ...)
GRID_SIZE = 16  # official DiT(input_size=16, patch_size=1): 256 tokens
ACT_TOKENS = ("act_batch", "act_length", "act_embed")

# Official evaluation commands (README): --gdm_d, --gdm_w, --head, --ratio per Hi-MAR variant.
VARIANTS = {
  "base": dict(depth=6, width=512, num_heads=8, mlp_ratio=4.0),
  "large": dict(depth=8, width=512, num_heads=8, mlp_ratio=4.0),
  "huge": dict(depth=12, width=768, num_heads=12, mlp_ratio=4.0),
}

XAVIER = nnx.initializers.xavier_uniform()
ZEROS = nnx.initializers.zeros_init()


@functools.lru_cache(maxsize=16)
def sincos_pos_embed_2d(width: int, grid_size: int) -> np.ndarray:
  """The fixed position table (grid_size ** 2, width) float32 of the official get_2d_sincos_pos_embed.

  Token l = row * grid_size + col. Channels [0, W/2) encode the column, [W/2, W) the row (the
  official meshgrid puts w first); each half is [sin(p w_k), cos(p w_k)] with
  w_k = 10000 ** (-k / (W / 4)), k < W / 4. Computed in float64, stored as float32 (as officially).
  """
  if width % 4:
    raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {width}")
  omega = 1.0 / 10000.0 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
  rows, cols = np.divmod(np.arange(grid_size * grid_size, dtype=np.float64), grid_size)

  def one_d(pos):
    angles = pos[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  table = np.concatenate([one_d(cols), one_d(rows)], axis=1).astype(np.float32)
  table.setflags(write=False)
  return table


def _torch_default_uniform(fan_in: int):
  """PyTorch's default Conv2d / Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and biases)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _linear(n_in: int, n_out: int, axes: tuple, kernel_init, dtype, rngs: nnx.Rngs, bias_init=ZEROS) -> nnx.Linear:
  return nnx.Linear(
    n_in,
    n_out,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(kernel_init, axes),
    bias_init=partitioned(bias_init, axes[-1:]),
    rngs=rngs,
  )


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


class PatchEmbed(nnx.Module):
  """The official PatchEmbed with patch size 1 (a 1x1 Conv2d), on tokens: (B, L, n_in) -> (B, L, W)."""

  def __init__(self, n_in: int, width: int, in_axis: str | None, *, default_init: bool, dtype, rngs: nnx.Rngs):
    if default_init:  # c_embedder: the official initialize_weights leaves it at PyTorch's default
      init = _torch_default_uniform(n_in)
      self.proj = _linear(n_in, width, (in_axis, "embed"), init, dtype, rngs, bias_init=init)
    else:
      self.proj = _linear(n_in, width, (in_axis, "embed"), XAVIER, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class TimestepEmbedder(nnx.Module):
  """t (B,) -> (B, W): sinusoidal(256) -> mlp_in -> SiLU -> mlp_out (official mlp.0, mlp.2)."""

  def __init__(self, width: int, *, dtype, rngs: nnx.Rngs):
    normal = nnx.initializers.normal(0.02)
    self.mlp_in = _linear(FREQUENCY_DIM, width, (None, "embed"), normal, dtype, rngs)
    self.mlp_out = _linear(width, width, (None, "embed"), normal, dtype, rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp_out(jax.nn.silu(self.mlp_in(timestep_embedding(t, FREQUENCY_DIM))))


class Attention(nnx.Module):
  """Full self-attention: fused qkv (W -> 3W, bias; outputs (3, H, Dh)), proj (W -> W).

  implementation: hmar_jax/models/dense_attention.py ('auto': cuDNN's fused attention on a GPU
  for bfloat16 compute, else the XLA einsums)."""

  def __init__(
    self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs, implementation: str = DEFAULT_IMPLEMENTATION
  ):
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    self.implementation = check_implementation(implementation)
    self.qkv = _linear(width, 3 * width, ("embed", "heads"), XAVIER, dtype, rngs)
    self.proj = _linear(width, width, ("heads", "embed"), XAVIER, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, L, W) -> (B, L, W)."""
    b, n, w = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    impl = resolve_implementation(self.implementation, dtype=q.dtype, head_dim=self.head_dim, dropout=False)
    return self.proj(dense_attention(q, k, v, implementation=impl).reshape(b, n, w))


class Mlp(nnx.Module):
  """fc1 (W -> hidden) -> tanh-GELU -> fc2 (hidden -> W)."""

  def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(width, hidden, ("embed", "mlp"), XAVIER, dtype, rngs)
    self.fc2 = _linear(hidden, width, ("mlp", "embed"), XAVIER, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
  """adaLN-Zero block with per-token modulation: x (B, L, W), c (B, L, W) -> (B, L, W) float32."""

  def __init__(
    self,
    width: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    dtype,
    rngs: nnx.Rngs,
    attn_implementation: str = DEFAULT_IMPLEMENTATION,
  ):
    self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs, implementation=attn_implementation)
    self.mlp = Mlp(width, int(width * mlp_ratio), dtype=dtype, rngs=rngs)
    self.ada_lin = _linear(width, 6 * width, ("embed", "adaln"), ZEROS, dtype, rngs)  # official adaLN_modulation.1

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mods = jnp.split(self.ada_lin(jax.nn.silu(c)).astype(jnp.float32), 6, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    x = x + gate_msa * self.attn(_modulate(layer_norm(x, LN_EPS), shift_msa, scale_msa)).astype(jnp.float32)
    x = x + gate_mlp * self.mlp(_modulate(layer_norm(x, LN_EPS), shift_mlp, scale_mlp)).astype(jnp.float32)
    return constrain(x, ACT_TOKENS)


class FinalLayer(nnx.Module):
  """x (B, L, W), c (B, L, W) -> linear(LN(x) * (1 + scale) + shift) (B, L, C) float32."""

  def __init__(self, width: int, out_channels: int, *, dtype, rngs: nnx.Rngs):
    self.ada_lin = _linear(width, 2 * width, ("embed", "adaln"), ZEROS, dtype, rngs)  # official adaLN_modulation.1
    self.linear = _linear(width, out_channels, ("embed", "cvae"), ZEROS, dtype, rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.ada_lin(jax.nn.silu(c)).astype(jnp.float32), 2, axis=-1)
    return self.linear(_modulate(layer_norm(x, LN_EPS), shift, scale)).astype(jnp.float32)


class DiT(nnx.Module):
  """The official DiT of Hi-MAR (patch size 1, learn_sigma=False): eps (B, L, C) float32 of
  x_t (B, L, C), original timesteps t (B,) and per-token conditions z (B, L, Cz)."""

  def __init__(
    self,
    in_channels: int,
    z_channels: int,
    depth: int,
    width: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    grid_size: int = GRID_SIZE,
    *,
    dtype=jnp.float32,
    attn_implementation: str = DEFAULT_IMPLEMENTATION,
    rngs: nnx.Rngs,
  ):
    self.in_channels = in_channels
    self.grid_size = grid_size
    self.width = width
    self.num_heads = num_heads
    self.mlp_ratio = float(mlp_ratio)
    self.x_embedder = PatchEmbed(in_channels, width, "cvae", default_init=False, dtype=dtype, rngs=rngs)
    self.t_embedder = TimestepEmbedder(width, dtype=dtype, rngs=rngs)
    self.c_embedder = PatchEmbed(z_channels, width, None, default_init=True, dtype=dtype, rngs=rngs)

    def make(r):
      return DiTBlock(width, num_heads, mlp_ratio, dtype=dtype, rngs=r, attn_implementation=attn_implementation)

    self.blocks = block_list(make, depth, rngs)
    self.final_layer = FinalLayer(width, in_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
    pos = jnp.asarray(sincos_pos_embed_2d(self.width, self.grid_size))
    h = constrain(self.x_embedder(x).astype(jnp.float32) + pos, ACT_TOKENS)
    c = self.t_embedder(t).astype(jnp.float32)[:, None] + self.c_embedder(z).astype(jnp.float32)
    for block in self.blocks:
      h = block(h, c)
    return self.final_layer(h, c)

  def forward_with_cfg(self, x: jax.Array, t: jax.Array, z: jax.Array, cfg_scale: float | jax.Array) -> jax.Array:
    """Guided eps (N, L, C) for z = [cond; uncond] (N even): the network sees the first half of x
    under both conditions; uncond + cfg (cond - uncond) is returned for both halves."""
    half = x[: x.shape[0] // 2]
    eps = self(jnp.concatenate([half, half], axis=0), t, z)
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([guided, guided], axis=0)


# ----------------------------------------------------------------------------- fixed-variance diffusion


def fixed_large_log_variance(d: gd.Diffusion) -> np.ndarray:
  """Official FIXED_LARGE log variance (T,) float64: log of [posterior_variance[1], betas[1:]]."""
  return np.log(np.append(d.posterior_variance[1], d.betas[1:]))


def p_sample_fixed_large(
  d: gd.Diffusion, model_fn, x: jax.Array, t: jax.Array, noise: jax.Array, temperature: float | jax.Array = 1.0
) -> dict[str, jax.Array]:
  """One reverse step x_t -> x_{t-1} of an eps-predicting model with FIXED_LARGE variance.

  x, noise: (N, ...); t: (N,) respaced step indices (the model gets the original timesteps);
  model_fn(x, ts) -> eps of x's shape. Returns {'sample', 'pred_xstart'}; no noise where t == 0;
  temperature scales the added noise only. No clipping of x_0 (official clip_denoised=False).
  """
  eps = model_fn(x, gd.model_timesteps(d, t)).astype(jnp.float32)
  pred_xstart = gd.predict_xstart_from_eps(d, x, t, eps)
  mean, _, _ = gd.q_posterior_mean_variance(d, pred_xstart, x, t)
  log_var = gd.extract(fixed_large_log_variance(d), t, x.ndim)
  nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  sample = mean + nonzero * jnp.exp(0.5 * log_var) * noise * temperature
  return {"sample": sample, "pred_xstart": pred_xstart}


def replace_known(
  d: gd.Diffusion, x: jax.Array, t: jax.Array, known: jax.Array, keep: jax.Array, init_noise: jax.Array
) -> jax.Array:
  """The official per-step replacement: where keep (N, L), x_t (N, L, C) becomes
  q_sample(known, t, init_noise), the known tokens noised to step t with the initial noise x_T."""
  renoised = gd.q_sample(d, known.astype(jnp.float32), t, init_noise)
  return jnp.where(keep[..., None], renoised, x)


# ----------------------------------------------------------------------------- the head


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"DiTHead: {name} must be a positive integer, got {value!r}")
  return value


class DiTHead(nnx.Module):
  """Hi-MAR's stage-2 diffusion head (official GlobalDiffLoss): joint diffusion of all L tokens.

  Args:
    target_channels: C, the token width (vae_embed_dim * patch_size ** 2 = 16).
    z_channels: Cz, the condition width (the MAR decoder width).
    depth, width, num_heads, mlp_ratio: the DiT (official --gdm_d, --gdm_w, --head, --ratio).
    grid_size: tokens per side (L = grid_size ** 2; officially 16).
    num_sampling_steps: respacing of the sampling diffusion (officially always '250').
    dtype: compute dtype of the network ('float32' or 'bfloat16'); parameters, LayerNorms, the
      residual stream and the diffusion maths stay float32.
    attn_implementation: 'auto' | 'xla' | 'cudnn' (hmar_jax/models/dense_attention.py).
  The network is `.net` (official key prefix 'net.').
  """

  def __init__(
    self,
    target_channels: int,
    z_channels: int,
    depth: int,
    width: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    grid_size: int = GRID_SIZE,
    num_sampling_steps: str | int = SAMPLING_STEPS,
    *,
    dtype=jnp.float32,
    attn_implementation: str = DEFAULT_IMPLEMENTATION,
    rngs: nnx.Rngs,
  ):
    for name, value in (
      ("target_channels", target_channels),
      ("z_channels", z_channels),
      ("depth", depth),
      ("width", width),
      ("num_heads", num_heads),
      ("grid_size", grid_size),
    ):
      _check_positive_int(name, value)
    if width % num_heads:
      raise ValueError(f"DiTHead: width {width} is not divisible by num_heads {num_heads}")
    if width % 4:
      raise ValueError(f"DiTHead: width must be divisible by 4 (2-D sin-cos positions), got {width}")
    if not (isinstance(mlp_ratio, (int, float)) and int(width * mlp_ratio) >= 1):
      raise ValueError(f"DiTHead: mlp_ratio must be a positive number, got {mlp_ratio!r}")
    self.num_sampling_steps = str(num_sampling_steps)
    gd.create_diffusion(self.num_sampling_steps, NOISE_SCHEDULE)  # a bad respacing fails here
    self.in_channels = target_channels
    self.z_channels = z_channels
    self.seq_len = grid_size * grid_size
    self.net = DiT(
      target_channels,
      z_channels,
      depth,
      width,
      num_heads,
      mlp_ratio,
      grid_size,
      dtype=jnp.dtype(dtype),
      attn_implementation=check_implementation(attn_implementation),
      rngs=rngs,
    )

  @property
  def train_diffusion(self) -> gd.Diffusion:
    return gd.create_diffusion("", NOISE_SCHEDULE)

  @property
  def gen_diffusion(self) -> gd.Diffusion:
    return gd.create_diffusion(self.num_sampling_steps, NOISE_SCHEDULE)

  def _check(self, what: str, x: jax.Array, channels: int, name: str, n: int | None = None):
    want = (n if n is not None else "N", self.seq_len, channels)
    if x.ndim != 3 or x.shape[1:] != (self.seq_len, channels) or (n is not None and x.shape[0] != n):
      raise ValueError(f"DiTHead.{what}: {name} must have shape {want}, got {tuple(x.shape)}")

  def _check_mask(self, what: str, mask: jax.Array, name: str, n: int):
    if tuple(mask.shape) != (n, self.seq_len):
      raise ValueError(f"DiTHead.{what}: {name} must have shape {(n, self.seq_len)}, got {tuple(mask.shape)}")

  def draw_training_noise(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The random draws of `loss`: t (n,) int32 uniform in [0, 1000) and noise (n, L, C) float32."""
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, (n,), 0, self.train_diffusion.num_timesteps, dtype=jnp.int32)
    return t, jax.random.normal(k_noise, (n, self.seq_len, self.in_channels), jnp.float32)

  def losses(self, target: jax.Array, z: jax.Array, mask: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Per-image loss (B,): mean over L x C of ((noise - eps(x_t)) * mask)^2 at steps t (B,).

    target, noise (B, L, C); z (B, L, Cz); mask (B, L), 1 where the token is to be predicted.
    """
    n = target.shape[0] if target.ndim == 3 else None
    self._check("loss", target, self.in_channels, "target")
    self._check("loss", z, self.z_channels, "z", n)
    self._check_mask("loss", mask, "mask", n)
    d = self.train_diffusion
    x_t = gd.q_sample(d, target.astype(jnp.float32), t, noise.astype(jnp.float32))
    eps = self.net(x_t, gd.model_timesteps(d, t), z)
    err = (noise.astype(jnp.float32) - eps) * mask.astype(jnp.float32)[..., None]
    return gd.mean_flat(jnp.square(err))

  def loss(self, target: jax.Array, z: jax.Array, mask: jax.Array, key: jax.Array) -> jax.Array:
    """Scalar training loss (official GlobalDiffLoss.forward): `losses` at random t / noise, batch mean."""
    t, noise = self.draw_training_noise(key, target.shape[0])
    return self.losses(target, z, mask, t, noise).mean()

  def sample(
    self,
    z: jax.Array,
    key: jax.Array,
    *,
    known: jax.Array | None = None,
    keep: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    cfg: float | jax.Array = 1.0,
  ) -> jax.Array:
    """Tokens (N, L, C) float32 for per-token conditions z (N, L, Cz) (module docstring).

    known (N, L, C) and keep (N, L) bool, both or neither: where keep is True the token is known
    and replaced at every step (official mask = ~keep, tokens = known). cfg: a Python number equal
    to 1.0 samples without guidance; anything else (or a traced array) means z = [cond; uncond]
    (N even, known / keep given for all N rows, as officially) and the output keeps both halves.
    temperature scales each step's noise only.
    """
    self._check("sample", z, self.z_channels, "z")
    n = z.shape[0]
    if (known is None) != (keep is None):
      raise ValueError("DiTHead.sample: give both known (N, L, C) and keep (N, L), or neither")
    if known is not None:
      self._check("sample", known, self.in_channels, "known", n)
      self._check_mask("sample", keep, "keep", n)
      if keep.dtype != jnp.bool_:
        raise ValueError(f"DiTHead.sample: keep must be a boolean mask, got dtype {keep.dtype}")
    guided = not (isinstance(cfg, (int, float)) and cfg == 1.0)
    shape = (self.seq_len, self.in_channels)
    k_init, k_loop = jax.random.split(key)
    net = precast_linears(self.net)  # the Linear weights cast once, not at each of the loop's steps
    if guided:
      if n % 2:
        raise ValueError(f"DiTHead.sample with cfg != 1 needs z = [cond; uncond] of even length, got {n} rows")
      half = jax.random.normal(k_init, (n // 2, *shape), jnp.float32)
      init_noise = jnp.concatenate([half, half], axis=0)
      model_fn = lambda x, ts: net.forward_with_cfg(x, ts, z, cfg)
    else:
      init_noise = jax.random.normal(k_init, (n, *shape), jnp.float32)
      model_fn = lambda x, ts: net(x, ts, z)
    d = self.gen_diffusion
    num = d.num_timesteps
    keys = gd.step_keys(k_loop, num)

    def body(i, x):
      t = jnp.full((n,), num - 1 - i, dtype=jnp.int32)
      if known is not None:
        x = replace_known(d, x, t, known, keep, init_noise)
      step_noise = jax.random.normal(keys[i], x.shape, jnp.float32)
      return p_sample_fixed_large(d, model_fn, x, t, step_noise, temperature)["sample"]

    return jax.lax.fori_loop(0, num, body, init_noise)
