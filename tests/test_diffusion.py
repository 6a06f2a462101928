"""The Gaussian diffusion of MAR's diffusion loss against float64 NumPy re-derivations.

The references (tests/torch_ref_diffloss.py) are written from alpha-bar(s) = cos((s + 0.008) / 1.008
* pi / 2)^2 directly, not from the coefficient tables of hmar_jax.models.diffusion. The code under
test computes in float32 (as the official code does after gathering its float64 tables), so the
tolerances are float32 ones: rtol 1e-5 for closed forms, 1e-4 for losses and multi-step loops.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref_diffloss import (  # noqa: E402
  RefSchedule,
  ref_cosine_betas,
  ref_hybrid_loss,
  ref_kept_steps,
  ref_p_sample,
)

from hmar_jax.models import diffusion as gd  # noqa: E402


def toy_model_np(x, ts):
  """A smooth stand-in for the network (N, C) -> (N, 2C) that depends on x_t and the timestep."""
  eps = 0.9 * x + 0.05 * np.cos(ts[:, None] / 300.0)
  v = np.tanh(x - ts[:, None] / 1000.0)
  return np.concatenate([eps, v], axis=1)


def toy_model_jax(x, ts):
  ts = ts.astype(jnp.float32)
  eps = 0.9 * x + 0.05 * jnp.cos(ts[:, None] / 300.0)
  v = jnp.tanh(x - ts[:, None] / 1000.0)
  return jnp.concatenate([eps, v], axis=1)


def rows(seed, n, c, scale=1.0):
  return np.random.default_rng(seed).standard_normal((n, c)) * scale


# ----------------------------------------------------------------------------- schedules


def test_cosine_betas_follow_the_alpha_bar_formula_with_beta_capped_at_0999():
  d = gd.create_diffusion("", "cosine")
  ref = ref_cosine_betas(1000)
  np.testing.assert_allclose(d.betas, ref, rtol=1e-12, atol=1e-15)
  assert d.betas[-1] == pytest.approx(0.999)  # the cap is reached at the last step
  np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1.0 - ref), rtol=1e-12)
  np.testing.assert_array_equal(d.timestep_map, np.arange(1000))


def test_respacing_100_keeps_evenly_spread_steps_and_recomputes_betas_from_the_kept_alpha_bars():
  d = gd.create_diffusion("100", "cosine")
  kept = ref_kept_steps(100)
  np.testing.assert_array_equal(d.timestep_map, kept)
  ref = RefSchedule(kept)
  np.testing.assert_allclose(d.betas, ref.beta, rtol=1e-10)
  np.testing.assert_allclose(d.alphas_cumprod, ref.abar, rtol=1e-10)
  np.testing.assert_allclose(d.posterior_variance, ref.posterior_var(np.arange(100)), rtol=1e-10)


def test_respacing_into_sections_spreads_each_sections_steps_over_that_section():
  kept = gd.space_timesteps(1000, "4,2")
  # two sections of 500 steps: 4 steps over [0, 499], 2 over [500, 999]
  assert kept == [*ref_kept_steps(4, 500).tolist(), *(500 + ref_kept_steps(2, 500)).tolist()]


@pytest.mark.parametrize(
  ("respacing", "message"),
  [("2000", "cannot divide a section of 1000 steps into 2000"), ("fast", "expected a step count"), ("1", "at least 2")],
)
def test_a_respacing_the_process_cannot_provide_is_refused_with_a_reason(respacing, message):
  with pytest.raises(ValueError, match=message):
    gd.create_diffusion(respacing, "cosine")


# ----------------------------------------------------------------------------- closed forms


def test_q_sample_and_the_posterior_match_float64():
  d = gd.create_diffusion("", "cosine")
  ref = RefSchedule()
  t = np.array([0, 1, 17, 500, 998, 999])
  x0, noise = rows(0, 6, 5), rows(1, 6, 5)
  xt = gd.q_sample(d, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(np.asarray(xt), ref.q_sample(x0, t, noise), rtol=1e-5, atol=1e-6)
  xt64 = ref.q_sample(x0, t, noise)
  mean, var, logvar = gd.q_posterior_mean_variance(
    d, jnp.asarray(x0, jnp.float32), jnp.asarray(xt64, jnp.float32), jnp.asarray(t)
  )
  np.testing.assert_allclose(np.asarray(mean), ref.posterior_mean(x0, xt64, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(var)[:, 0], ref.posterior_var(t), rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(np.asarray(logvar)[:, 0], ref.posterior_log_var_clipped(t), rtol=1e-5)


def test_learned_range_variance_interpolates_the_log_variance_between_posterior_and_beta():
  d = gd.create_diffusion("10", "cosine")
  ref = RefSchedule(ref_kept_steps(10))
  t = np.array([0, 1, 5, 9])
  xt = rows(2, 4, 3)
  out = np.concatenate([rows(3, 4, 3), np.tanh(rows(4, 4, 3))], axis=1)
  got = gd.p_mean_variance(d, jnp.asarray(out, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  mean, logvar, x0 = ref.p_mean_logvar(out, xt, t)
  np.testing.assert_allclose(np.asarray(got["log_variance"]), logvar, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got["pred_xstart"]), x0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got["mean"]), mean, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training loss


def test_training_losses_match_the_float64_hybrid_loss_including_the_decoder_term_at_t0():
  d = gd.create_diffusion("", "cosine")
  ref = RefSchedule()
  t = np.array([0, 0, 0, 1, 250, 999])
  x0 = np.clip(rows(5, 6, 4, 0.6), -0.9, 0.9)
  x0[0, 0], x0[1, 1] = 0.9995, -0.9995  # the decoder's open edge bins
  noise = rows(6, 6, 4)
  got = gd.training_losses(
    d, toy_model_jax, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32)
  )
  xt = ref.q_sample(x0, t, noise)
  want = ref_hybrid_loss(ref, toy_model_np(xt, t), x0, t, noise)
  for name in ("mse", "vb", "loss"):
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_variational_term_trains_only_the_variance_and_the_mse_only_the_eps():
  d = gd.create_diffusion("", "cosine")
  x0, noise = jnp.asarray(rows(7, 3, 2, 0.5), jnp.float32), jnp.asarray(rows(8, 3, 2), jnp.float32)
  t = jnp.array([0, 10, 700])

  def term(out_param, name):
    return gd.training_losses(d, lambda x, ts: out_param + 0 * x.sum(), x0, t, noise)[name].sum()

  out = jnp.asarray(np.concatenate([rows(9, 3, 2), np.tanh(rows(10, 3, 2))], axis=1), jnp.float32)
  grad = jax.jit(jax.grad(term), static_argnums=1)
  g_vb, g_mse = np.asarray(grad(out, "vb")), np.asarray(grad(out, "mse"))
  assert np.all(g_vb[:, :2] == 0) and np.all(np.abs(g_vb[:, 2:]) > 0)
  assert np.all(g_mse[:, 2:] == 0) and np.all(np.abs(g_mse[:, :2]) > 0)


# ----------------------------------------------------------------------------- sampling


def test_one_reverse_step_matches_the_reference_with_fixed_noise_and_shows_the_model_original_timesteps():
  d = gd.create_diffusion("10", "cosine")
  ref = RefSchedule(ref_kept_steps(10))
  t = np.array([9, 4, 1, 0])
  x, noise = rows(11, 4, 3), rows(12, 4, 3)
  got = gd.p_sample(
    d, toy_model_jax, jnp.asarray(x, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32), temperature=0.7
  )["sample"]
  want = ref_p_sample(ref, toy_model_np(x, ref.kept[t]), x, t, noise, temperature=0.7)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_the_respaced_sample_loop_matches_a_step_by_step_reference():
  steps, temperature = 10, 0.8
  d = gd.create_diffusion(str(steps), "cosine")
  ref = RefSchedule(ref_kept_steps(steps))
  key = jax.random.key(3)
  x_T = rows(13, 5, 3)
  got = jax.jit(lambda x, k: gd.p_sample_loop(d, toy_model_jax, x, k, temperature))(jnp.asarray(x_T, jnp.float32), key)
  keys = gd.step_keys(key, steps)
  x = x_T
  for i, step in enumerate(range(steps - 1, -1, -1)):
    t = np.full(5, step)
    noise = np.asarray(jax.random.normal(keys[i], x.shape, jnp.float32), np.float64)
    x = ref_p_sample(ref, toy_model_np(x, ref.kept[t]), x, t, noise, temperature)
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


def test_temperature_zero_makes_the_loop_deterministic_given_the_initial_noise():
  d = gd.create_diffusion("5", "cosine")
  x_T = jnp.asarray(rows(14, 4, 2), jnp.float32)
  a = gd.p_sample_loop(d, toy_model_jax, x_T, jax.random.key(0), temperature=0.0)
  b = gd.p_sample_loop(d, toy_model_jax, x_T, jax.random.key(1), temperature=0.0)
  c = gd.p_sample_loop(d, toy_model_jax, x_T, jax.random.key(1), temperature=1.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
