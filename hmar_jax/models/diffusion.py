"""Gaussian diffusion of MAR's diffusion loss (LTH14/mar diffusion/, itself from IDDPM / ADM / DiT).

Only the configuration MAR uses is implemented: epsilon prediction, learned-range variance (the
model outputs 2 x C channels: eps, then v in [-1, 1] interpolating the log variance between the
clipped posterior variance and beta), loss 'hybrid' = MSE on eps + the variational bound term in
bits with the mean's gradient stopped. Schedules are 'cosine' (MAR) and 'linear'.

The schedule is a frozen `Diffusion` of NumPy float64 arrays (as the official code keeps them);
every function here gathers `arr[t]` and casts to float32 before multiplying, exactly as the official
`_extract_into_tensor` does, so the maths runs in float32 whatever the model's compute dtype.

Respacing (official respace.py): `space_timesteps(1000, '100')` keeps 100 of the 1000 steps; the
respaced betas are recomputed from the kept alphas_cumprod (1 - abar[k_i] / abar[k_{i-1}]), and
`timestep_map[i]` is the original timestep k_i the model is shown for respaced step i (the model
always sees original timesteps in [0, 1000)). With respacing '' every step is kept (the training
diffusion), and the recomputed betas equal the originals up to float64 rounding.

Temperature (official gaussian_diffusion.p_sample): it multiplies only the noise added at each
reverse step, x_{t-1} = mean + [t != 0] * exp(0.5 * log_var) * noise * temperature; the initial
noise x_T is NOT scaled (DiffLoss.sample draws it with a plain randn).

Arrays are (N, C) (or (N, ...)); t is an int (N,) array of (respaced) step indices. All shapes are
static; the sample loop is a `lax.fori_loop` with one PRNG key per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# model_fn(x (N, C) float32, t (N,) int32 ORIGINAL timesteps) -> (N, 2C): eps, then variance values.
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

NOISE_SCHEDULES = ("cosine", "linear")


# ----------------------------------------------------------------------------- schedules


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
  """beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta), float64 (T,)."""
  return np.array(
    [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
    dtype=np.float64,
  )


def named_betas(noise_schedule: str, num_steps: int) -> np.ndarray:
  """The official get_named_beta_schedule: 'cosine' (IDDPM, s = 0.008, max beta 0.999) or 'linear'."""
  if noise_schedule == "cosine":
    return betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
  if noise_schedule == "linear":
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
  raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """The original timesteps kept by respacing, sorted (official respace.space_timesteps).

  section_counts: 'N' / N (N steps spread evenly), 'a,b,c' (the process cut in equal sections with
  a, b, c steps), or 'ddimN' (the fixed integer stride giving exactly N steps).
  """
  if isinstance(section_counts, str):
    text = section_counts.strip()
    if text.startswith("ddim"):
      try:
        desired = int(text[len("ddim") :])
      except ValueError:
        raise ValueError(f"timestep respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride")
    try:
      counts = [int(x) for x in text.split(",")]
    except ValueError:
      raise ValueError(
        f"timestep respacing {section_counts!r}: expected a step count like '100', counts per section "
        "like '10,20' or 'ddim50'"
      ) from None
  elif isinstance(section_counts, (int, np.integer)):
    counts = [int(section_counts)]
  else:
    counts = [int(x) for x in section_counts]
  if not counts or any(c < 1 for c in counts):
    raise ValueError(f"timestep respacing {section_counts!r}: every section needs at least one step")
  size_per, extra = divmod(num_timesteps, len(counts))
  start, steps = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"timestep respacing {section_counts!r}: cannot divide a section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    # The official code accumulates the fractional stride and rounds with Python's round().
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(steps))


@dataclasses.dataclass(frozen=True, eq=False)
class Diffusion:
  """A (possibly respaced) diffusion schedule; every array is float64 (T,), T = num_timesteps."""

  betas: np.ndarray
  timestep_map: np.ndarray  # int (T,): the original timestep of each step (what the model sees)
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  log_betas: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @classmethod
  def from_betas(cls, betas: np.ndarray, timestep_map: Sequence[int] | None = None) -> Diffusion:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
      raise ValueError(f"a diffusion needs at least 2 steps (betas of shape (T,), T >= 2), got shape {betas.shape}")
    if not (np.all(betas > 0) and np.all(betas <= 1)):
      raise ValueError("every beta must lie in (0, 1]")
    tmap = np.arange(betas.shape[0]) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return cls(
      betas=betas,
      timestep_map=tmap,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
      posterior_variance=post_var,
      # the posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
      posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
      log_betas=np.log(betas),
    )


@functools.lru_cache(maxsize=32)
def create_diffusion(
  timestep_respacing: str | int | None = "", noise_schedule: str = "cosine", diffusion_steps: int = 1000
) -> Diffusion:
  """The official create_diffusion (learned-range variance, eps prediction, MSE + VB loss).

  timestep_respacing: '' or None keeps all `diffusion_steps`; otherwise see `space_timesteps`.
  Cached: the same arguments give the same object.
  """
  base = Diffusion.from_betas(named_betas(noise_schedule, diffusion_steps))
  if timestep_respacing is None or timestep_respacing == "":
    timestep_respacing = [diffusion_steps]
  kept = space_timesteps(diffusion_steps, timestep_respacing)
  # Respaced betas: from consecutive kept alphas_cumprod (the first relative to 1.0).
  ac_kept = base.alphas_cumprod[kept]
  new_betas = 1.0 - ac_kept / np.append(1.0, ac_kept[:-1])
  return Diffusion.from_betas(new_betas, kept)


# ----------------------------------------------------------------------------- gathering


def extract(arr: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  """arr[t] as float32, shaped (N, 1, ...) to broadcast against an ndim-dimensional (N, ...) array."""
  out = jnp.asarray(np.asarray(arr, dtype=np.float32))[t]
  return out.reshape(out.shape + (1,) * (ndim - 1))


def model_timesteps(d: Diffusion, t: jax.Array) -> jax.Array:
  """Respaced step indices (N,) -> the original timesteps (N,) int32 the model is conditioned on."""
  return jnp.asarray(d.timestep_map, dtype=jnp.int32)[t]


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all but the first axis: (N, ...) -> (N,)."""
  return x.mean(axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------- forward process


def q_sample(d: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """A draw of q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, (N, ...)."""
  n = x_start.ndim
  return extract(d.sqrt_alphas_cumprod, t, n) * x_start + extract(d.sqrt_one_minus_alphas_cumprod, t, n) * noise


def q_posterior_mean_variance(
  d: Diffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_{t-1} | x_t, x_0): (mean (N, ...), variance (N, 1...), clipped log variance (N, 1...))."""
  n = x_t.ndim
  mean = extract(d.posterior_mean_coef1, t, n) * x_start + extract(d.posterior_mean_coef2, t, n) * x_t
  return mean, extract(d.posterior_variance, t, n), extract(d.posterior_log_variance_clipped, t, n)


def predict_xstart_from_eps(d: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  n = x_t.ndim
  return extract(d.sqrt_recip_alphas_cumprod, t, n) * x_t - extract(d.sqrt_recipm1_alphas_cumprod, t, n) * eps


# ----------------------------------------------------------------------------- reverse process


def p_mean_variance(
  d: Diffusion, model_output: jax.Array, x: jax.Array, t: jax.Array, clip_denoised: bool = False
) -> dict[str, jax.Array]:
  """p(x_{t-1} | x_t) from the model's output (N, 2C) at x (N, C), learned-range variance.

  Returns {'mean', 'variance', 'log_variance', 'pred_xstart'}, each (N, C).
  """
  c = x.shape[1]
  if model_output.shape[1] != 2 * c:
    raise ValueError(f"the model must output 2 x {c} channels (eps and variance), got shape {model_output.shape}")
  model_output = model_output.astype(jnp.float32)
  eps, var_values = model_output[:, :c], model_output[:, c:]
  n = x.ndim
  min_log = extract(d.posterior_log_variance_clipped, t, n)
  max_log = extract(d.log_betas, t, n)
  frac = (var_values + 1) / 2  # v in [-1, 1] spans [posterior variance, beta]
  log_variance = frac * max_log + (1 - frac) * min_log
  pred_xstart = predict_xstart_from_eps(d, x, t, eps)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1, 1)
  mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x, t)
  return {"mean": mean, "variance": jnp.exp(log_variance), "log_variance": log_variance, "pred_xstart": pred_xstart}


def p_sample(
  d: Diffusion,
  model_fn: ModelFn,
  x: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  temperature: float | jax.Array = 1.0,
  clip_denoised: bool = False,
) -> dict[str, jax.Array]:
  """One reverse step x_t -> x_{t-1} (official p_sample) with the given standard-normal `noise`.

  t: (N,) respaced step indices; the model is called with the original timesteps. Temperature
  scales the added noise only; no noise is added where t == 0. Returns {'sample', 'pred_xstart'}.
  """
  out = p_mean_variance(d, model_fn(x, model_timesteps(d, t)), x, t, clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def step_keys(key: jax.Array, num_timesteps: int) -> jax.Array:
  """The per-step PRNG keys of `p_sample_loop`: row i is used for the i-th step taken (t = T-1-i)."""
  return jax.random.split(key, num_timesteps)


def p_sample_loop(
  d: Diffusion,
  model_fn: ModelFn,
  noise: jax.Array,
  key: jax.Array,
  temperature: float | jax.Array = 1.0,
  clip_denoised: bool = False,
) -> jax.Array:
  """Ancestral sampling from x_T = `noise` (N, C) down to x_0, over all d.num_timesteps steps.

  The i-th step (t = T-1-i) adds jax.random.normal(step_keys(key, T)[i], x.shape) * temperature
  (scaled by the step's standard deviation). Jit-friendly: one lax.fori_loop.
  """
  num = d.num_timesteps
  keys = step_keys(key, num)
  x0 = noise.astype(jnp.float32)

  def body(i, x):
    t = jnp.full((x.shape[0],), num - 1 - i, dtype=jnp.int32)
    step_noise = jax.random.normal(keys[i], x.shape, jnp.float32)
    return p_sample(d, model_fn, x, t, step_noise, temperature, clip_denoised)["sample"]

  return jax.lax.fori_loop(0, num, body, x0)


# ----------------------------------------------------------------------------- losses


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise (broadcasting), in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF used by the official code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """log P(x) of a Gaussian discretised into bins of width 2/255 on [-1, 1] (edge bins open), nats.

  x, means, log_scales: the same shape.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(d: Diffusion, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """The variational-bound term in bits (N,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
  the decoder NLL -log p(x_0 | x_1) for t == 0 (model_output (N, 2C) as for p_mean_variance)."""
  true_mean, _, true_log_var = q_posterior_mean_variance(d, x_start, x_t, t)
  out = p_mean_variance(d, model_output, x_t, t, clip_denoised=False)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
  nll = mean_flat(nll) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def training_losses(
  d: Diffusion, model_fn: ModelFn, x_start: jax.Array, t: jax.Array, noise: jax.Array
) -> dict[str, jax.Array]:
  """The hybrid loss per example (official training_losses, LossType.MSE with learned-range variance).

  x_start, noise: (N, C); t: (N,) step indices (the model sees timestep_map[t]). Returns
  {'mse': (N,) mean squared eps error, 'vb': (N,) VB term in bits, 'loss': mse + vb}. The VB term
  trains only the variance: the eps half of the output enters it through stop_gradient.
  """
  x_start = x_start.astype(jnp.float32)
  noise = noise.astype(jnp.float32)
  x_t = q_sample(d, x_start, t, noise)
  out = model_fn(x_t, model_timesteps(d, t)).astype(jnp.float32)
  c = x_start.shape[1]
  if out.shape != (x_start.shape[0], 2 * c) + x_start.shape[2:]:
    raise ValueError(f"the model must output 2 x {c} channels (eps and variance), got shape {out.shape}")
  eps = out[:, :c]
  frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[:, c:]], axis=1)
  vb = vb_terms_bpd(d, frozen, x_start, x_t, t)
  mse = mean_flat(jnp.square(noise - eps))
  return {"mse": mse, "vb": vb, "loss": mse + vb}
