"""MAR's diffusion loss head (LTH14/mar models/diffloss.py) in Flax NNX.

`SimpleMLPAdaLN` predicts, for a noisy token x_t (N, C) at original timestep t given the backbone's
condition z (N, Cz), the noise eps and the variance interpolation v (output (N, 2C)):

  y = TimestepEmbedder(t) + cond_embed(z)           TimestepEmbedder: 256 sinusoidal frequencies
                                                    ([cos, sin], max period 1e4) -> Linear -> SiLU -> Linear
  h = input_proj(x_t)
  depth x ResBlock: (shift, scale, gate) = Linear(SiLU(y)) in 3 chunks of `width`;
                    h += gate * MLP(LN(h) * (1 + scale) + shift), LN affine with eps 1e-6,
                    MLP = Linear -> SiLU -> Linear
  FinalLayer:       (shift, scale) = Linear(SiLU(y)); out = Linear(LN(h) * (1 + scale) + shift),
                    LN without affine, eps 1e-6

Init as the official initialize_weights: xavier-uniform Linear kernels with zero biases, the time MLP
kernels normal(0.02), and zeros for every adaLN modulation and for the final Linear (a fresh head
outputs 0).

`DiffLoss.loss`: t ~ U{0..999}, hybrid loss of the 1000-step cosine diffusion per token, then the
mean over tokens where mask is 1 (sum(loss * mask) / sum(mask)) or over all tokens.
`DiffLoss.sample`: the respaced (num_sampling_steps) cosine diffusion, ancestral sampling from plain
standard-normal noise; temperature scales only the per-step noise (hmar_jax/models/diffusion.py).
With classifier-free guidance (cfg != 1) z is [cond; uncond] halves: the initial noise is one
(N/2, C) draw used for both halves, the model runs on the first half's x_t twice (once per
condition), eps = uncond + cfg * (cond - uncond) is given to BOTH halves while each half keeps its own
variance output, and the per-step noise is drawn independently for all N rows (so the second half's
x_t drifts from the first's). The output keeps both halves; MAR uses the first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.models import diffusion as gd
from hmar_jax.models.blocks import block_list
from hmar_jax.models.precast import precast_linears

FREQUENCY_DIM = 256
NOISE_SCHEDULE = "cosine"
LN_EPS = 1e-6


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embeddings (N, dim) float32 of timesteps t (N,): [cos(t f), sin(t f)] with
  f_k = exp(-ln(max_period) k / (dim // 2)), k < dim // 2 (a zero column appended for odd dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


def _linear(n_in: int, n_out: int, kernel_init, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
    n_in,
    n_out,
    kernel_init=kernel_init,
    bias_init=nnx.initializers.zeros_init(),
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


XAVIER = nnx.initializers.xavier_uniform()
ZEROS = nnx.initializers.zeros_init()


class TimestepEmbedder(nnx.Module):
  """t (N,) -> (N, width): sinusoidal(256) -> mlp_in -> SiLU -> mlp_out (official mlp.0, mlp.2)."""

  def __init__(self, width: int, *, frequency_dim: int = FREQUENCY_DIM, dtype=jnp.float32, rngs: nnx.Rngs):
    self.frequency_dim = frequency_dim
    self.mlp_in = _linear(frequency_dim, width, nnx.initializers.normal(0.02), dtype, rngs)
    self.mlp_out = _linear(width, width, nnx.initializers.normal(0.02), dtype, rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp_out(jax.nn.silu(self.mlp_in(timestep_embedding(t, self.frequency_dim))))


class ResBlock(nnx.Module):
  """x (N, W), y (N, W) -> x + gate * MLP(modulate(LN(x), shift, scale))."""

  def __init__(self, width: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_ln = nnx.LayerNorm(width, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.mlp_in = _linear(width, width, XAVIER, dtype, rngs)
    self.mlp_out = _linear(width, width, XAVIER, dtype, rngs)
    self.ada_lin = _linear(width, 3 * width, ZEROS, dtype, rngs)  # official adaLN_modulation.1

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.modulated(x, *jnp.split(self.ada_lin(jax.nn.silu(y)), 3, axis=-1))

  def modulated(self, x: jax.Array, shift: jax.Array, scale: jax.Array, gate: jax.Array) -> jax.Array:
    """The block given its adaLN modulation (each (N, W))."""
    h = modulate(self.in_ln(x), shift, scale)
    return x + gate * self.mlp_out(jax.nn.silu(self.mlp_in(h)))


class FinalLayer(nnx.Module):
  """x (N, W), y (N, W) -> linear(modulate(LN(x), shift, scale)) (N, out)."""

  def __init__(self, width: int, out_channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm_final = nnx.LayerNorm(
      width, epsilon=LN_EPS, use_scale=False, use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )
    self.ada_lin = _linear(width, 2 * width, ZEROS, dtype, rngs)  # official adaLN_modulation.1
    self.linear = _linear(width, out_channels, ZEROS, dtype, rngs)

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.modulated(x, *jnp.split(self.ada_lin(jax.nn.silu(y)), 2, axis=-1))

  def modulated(self, x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return self.linear(modulate(self.norm_final(x), shift, scale))


def _apply_block(block: ResBlock, x: jax.Array, y: jax.Array) -> jax.Array:
  return block(x, y)


class SimpleMLPAdaLN(nnx.Module):
  """The MLP of the diffusion loss: (x (N, in), t (N,) original timesteps, c (N, Cz)) -> (N, out) float32."""

  def __init__(
    self,
    in_channels: int,
    model_channels: int,
    out_channels: int,
    z_channels: int,
    num_res_blocks: int,
    grad_checkpointing: bool = False,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.grad_checkpointing = bool(grad_checkpointing)
    self.dtype = jnp.dtype(dtype)
    self.time_embed = TimestepEmbedder(model_channels, dtype=self.dtype, rngs=rngs)
    self.cond_embed = _linear(z_channels, model_channels, XAVIER, self.dtype, rngs)
    self.input_proj = _linear(in_channels, model_channels, XAVIER, self.dtype, rngs)
    self.res_blocks = block_list(lambda r: ResBlock(model_channels, dtype=self.dtype, rngs=r), num_res_blocks, rngs)
    self.final_layer = FinalLayer(model_channels, out_channels, dtype=self.dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
    h = self.input_proj(x.astype(self.dtype))
    y = self.time_embed(t) + self.cond_embed(c.astype(self.dtype))
    # Recompute each block in the backward pass (official torch.utils.checkpoint per block).
    apply = nnx.remat(_apply_block) if self.grad_checkpointing else _apply_block
    for block in self.res_blocks:
      h = apply(block, h, y)
    return self.final_layer(h, y).astype(jnp.float32)

  def forward_with_cfg(self, x: jax.Array, t: jax.Array, c: jax.Array, cfg_scale: float | jax.Array) -> jax.Array:
    """Guided output (N, out) for c = [cond; uncond] (N even): the model sees the first half of x
    under both conditions; eps (the first in_channels) = uncond + cfg (cond - uncond), given to both
    halves; the variance channels stay per half."""
    return guided(lambda x, t: self(x, t, c), x, t, cfg_scale, self.in_channels)

  def sampling_fn(self, c: jax.Array, timesteps: np.ndarray) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """fn(x (N, in), t (N,)) -> self(x, t, c), for a loop that runs the MLP many times under one
    condition c (N, Cz), each t entry one of `timesteps` (the loop's original timesteps).

    What stays the same from step to step is computed once, here: cond_embed(c), the time
    embedding of every timestep, the Linear weights in the compute dtype (`precast_linears`), and
    the adaLN kernels of the blocks and the final layer side by side, so that a step takes one
    matmul for all the modulations (each reads the same SiLU(y)) instead of depth + 1, and none
    for the embeddings. A step finds its row of the time table with one comparison against all
    timesteps (searchsorted's default is a loop of log2(T) dependent steps, each a kernel).
    """
    net = precast_linears(self)
    timesteps = np.asarray(timesteps)
    order = np.argsort(timesteps, kind="stable")
    sorted_steps = jnp.asarray(timesteps[order], jnp.int32)
    time_table = self.time_embed(sorted_steps)  # (T, W), row k for sorted_steps[k]
    c_emb = self.cond_embed(c.astype(self.dtype))
    adas = [block.ada_lin for block in self.res_blocks] + [self.final_layer.ada_lin]
    kernel = jnp.concatenate([a.kernel[...].astype(self.dtype) for a in adas], axis=1)
    bias = jnp.concatenate([a.bias[...].astype(self.dtype) for a in adas])

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
      h = net.input_proj(x.astype(self.dtype))
      row = jnp.searchsorted(sorted_steps, t.astype(jnp.int32), method="compare_all")
      y = time_table[row] + c_emb
      mods = jnp.split(jnp.dot(jax.nn.silu(y).astype(self.dtype), kernel) + bias, 3 * len(net.res_blocks) + 2, axis=-1)
      for i, block in enumerate(net.res_blocks):
        h = block.modulated(h, *mods[3 * i : 3 * i + 3])
      return net.final_layer.modulated(h, *mods[-2:]).astype(jnp.float32)

    return fn


def guided(fn: Callable[[jax.Array, jax.Array], jax.Array], x, t, cfg_scale, in_channels: int) -> jax.Array:
  """fn's guided output (N, out) for rows [cond; uncond] (N even): fn sees the first half of x twice
  (once per condition); eps (the first in_channels) = uncond + cfg (cond - uncond), given to both
  halves; the variance channels stay per half."""
  half = x[: x.shape[0] // 2]
  out = fn(jnp.concatenate([half, half], axis=0), t)
  eps, rest = out[:, :in_channels], out[:, in_channels:]
  cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
  half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
  return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=1)


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"DiffLoss: {name} must be a positive integer, got {value!r}")
  return value


class DiffLoss(nnx.Module):
  """The diffusion loss head: per-token conditional diffusion of C-dimensional tokens given z.

  Args:
    target_channels: C, the token width (MAR: vae_embed_dim * patch_size ** 2).
    z_channels: Cz, the condition width (MAR: decoder_embed_dim).
    depth, width: ResBlocks and their width (MAR: diffloss_d, diffloss_w).
    num_sampling_steps: the respacing of the sampling diffusion, e.g. '100' (see
      diffusion.space_timesteps); checked here.
    grad_checkpointing: rematerialise each ResBlock in the backward pass.
    dtype: compute dtype of the MLP ('float32' or 'bfloat16'); parameters and the diffusion
      maths stay float32.
  """

  def __init__(
    self,
    target_channels: int,
    z_channels: int,
    depth: int,
    width: int,
    num_sampling_steps: str | int,
    grad_checkpointing: bool = False,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    for name, value in (
      ("target_channels", target_channels),
      ("z_channels", z_channels),
      ("depth", depth),
      ("width", width),
    ):
      _check_positive_int(name, value)
    self.num_sampling_steps = str(num_sampling_steps)
    gd.create_diffusion(self.num_sampling_steps, NOISE_SCHEDULE)  # a bad respacing fails here, not when sampling
    self.in_channels = target_channels
    self.z_channels = z_channels
    self.net = SimpleMLPAdaLN(
      target_channels,
      width,
      2 * target_channels,  # eps and the learned variance
      z_channels,
      depth,
      grad_checkpointing,
      dtype=dtype,
      rngs=rngs,
    )

  @property
  def train_diffusion(self) -> gd.Diffusion:
    return gd.create_diffusion("", NOISE_SCHEDULE)

  @property
  def gen_diffusion(self) -> gd.Diffusion:
    return gd.create_diffusion(self.num_sampling_steps, NOISE_SCHEDULE)

  def _check(self, what: str, x: jax.Array, channels: int, name: str):
    if x.ndim != 2 or x.shape[1] != channels:
      raise ValueError(f"DiffLoss.{what}: {name} must have shape (N, {channels}), got {tuple(x.shape)}")

  def draw_training_noise(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The random draws of `loss`: t (n,) int32 uniform in [0, 1000) and noise (n, C) float32."""
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, (n,), 0, self.train_diffusion.num_timesteps, dtype=jnp.int32)
    return t, jax.random.normal(k_noise, (n, self.in_channels), jnp.float32)

  def token_losses(self, target: jax.Array, z: jax.Array, t: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """{'loss', 'mse', 'vb'}, each (N,), for targets (N, C), conditions z (N, Cz), steps t, noise."""
    self._check("loss", target, self.in_channels, "target")
    self._check("loss", z, self.z_channels, "z")
    if z.shape[0] != target.shape[0]:
      raise ValueError(f"DiffLoss.loss: target has {target.shape[0]} rows but z has {z.shape[0]}")
    return gd.training_losses(self.train_diffusion, lambda x, ts: self.net(x, ts, z), target, t, noise)

  def loss(self, target: jax.Array, z: jax.Array, key: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Scalar: the hybrid loss averaged over the tokens (N,) where mask is 1, or over all tokens."""
    t, noise = self.draw_training_noise(key, target.shape[0])
    per_token = self.token_losses(target, z, t, noise)["loss"]
    if mask is None:
      return per_token.mean()
    if mask.shape != per_token.shape:
      raise ValueError(f"DiffLoss.loss: mask must have shape {per_token.shape}, got {tuple(mask.shape)}")
    mask = mask.astype(jnp.float32)
    return (per_token * mask).sum() / mask.sum()

  def sample(
    self, z: jax.Array, key: jax.Array, temperature: float | jax.Array = 1.0, cfg: float | jax.Array = 1.0
  ) -> jax.Array:
    """Tokens (N, C) float32 for conditions z (N, Cz).

    cfg: a Python number equal to 1.0 samples without guidance; any other value (or a traced
    array, which always takes the guided path) means z = [cond; uncond] (N even) and the output
    has the same two halves (module docstring). temperature: scales each step's noise only.
    """
    self._check("sample", z, self.z_channels, "z")
    n = z.shape[0]
    k_init, k_loop = jax.random.split(key)
    guided_cfg = not (isinstance(cfg, (int, float)) and cfg == 1.0)
    if guided_cfg:
      if n % 2:
        raise ValueError(f"DiffLoss.sample with cfg != 1 needs z = [cond; uncond] of even length, got {n} rows")
      half = jax.random.normal(k_init, (n // 2, self.in_channels), jnp.float32)
      noise = jnp.concatenate([half, half], axis=0)
    else:
      noise = jax.random.normal(k_init, (n, self.in_channels), jnp.float32)
    d = self.gen_diffusion
    net_fn = self.net.sampling_fn(z, d.timestep_map)
    model_fn = (lambda x, ts: guided(net_fn, x, ts, cfg, self.in_channels)) if guided_cfg else net_fn
    return gd.p_sample_loop(d, model_fn, noise, k_loop, temperature, clip_denoised=False)
