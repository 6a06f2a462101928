"""MAR's diffusion loss head (hmar_jax.models.diffloss) and its converter, against a PyTorch
re-statement of the official network (tests/torch_ref_diffloss.py) with random weights converted by
hmar_jax.convert.diffloss, and float64 NumPy diffusion references.

Tolerances: the network in float32 against torch float32, rtol 1e-5 / atol 1e-5 on outputs of order
1; losses rtol 1e-4; full sample loops, whose first reverse steps amplify float32 rounding by up to
~2e4 (1 / sqrt(alpha_bar) at t = 999), 1e-3 relative to each element's magnitude.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flax import nnx  # noqa: E402
from torch_ref_diffloss import (  # noqa: E402
  RefSchedule,
  TorchDiffLoss,
  randomized_torch_diffloss,
  ref_hybrid_loss,
  ref_kept_steps,
  ref_p_sample,
)

from hmar_jax.convert.common import ConversionError  # noqa: E402
from hmar_jax.convert.diffloss import convert_diffloss_state_dict, diffloss_entries  # noqa: E402
from hmar_jax.models import diffusion as gd  # noqa: E402
from hmar_jax.models.diffloss import DiffLoss  # noqa: E402

C, CZ, DEPTH, WIDTH, STEPS = 4, 12, 2, 32, 10


@pytest.fixture(scope="module")
def torch_head():
  return randomized_torch_diffloss(C, CZ, DEPTH, WIDTH, seed=0)


@pytest.fixture(scope="module")
def sd(torch_head):
  return {k: v.detach().numpy().copy() for k, v in torch_head.state_dict().items()}


def make_head(sd=None, **kw) -> DiffLoss:
  head = DiffLoss(C, CZ, DEPTH, WIDTH, str(STEPS), rngs=nnx.Rngs(0), **kw)
  if sd is not None:
    nnx.update(head, convert_diffloss_state_dict(sd, head))
  return head


@pytest.fixture(scope="module")
def head(sd):
  return make_head(sd)


def torch_net_np(net, x, ts, z, cfg=None):
  """The torch network in float64 on NumPy inputs."""
  net64 = net.double()
  args = (torch.tensor(x, dtype=torch.float64), torch.tensor(np.asarray(ts)), torch.tensor(z, dtype=torch.float64))
  with torch.no_grad():
    out = net64(*args) if cfg is None else net64.forward_with_cfg(*args, cfg)
  net.float()
  return out.numpy()


def rows(seed, n, c, scale=1.0):
  return np.random.default_rng(seed).standard_normal((n, c)) * scale


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want) / (np.abs(want) + 1e-3 * np.abs(want).max())))


# ----------------------------------------------------------------------------- network


def test_the_network_matches_the_torch_restatement_on_converted_random_weights(torch_head, head):
  x, z = rows(0, 6, C), rows(1, 6, CZ)
  ts = np.array([0, 1, 10, 500, 998, 999])
  with torch.no_grad():
    want = torch_head.net(torch.tensor(x, dtype=torch.float32), torch.tensor(ts), torch.tensor(z, dtype=torch.float32))
  got = head.net(jnp.asarray(x, jnp.float32), jnp.asarray(ts), jnp.asarray(z, jnp.float32))
  assert got.shape == (6, 2 * C) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)


def test_guided_forward_gives_both_halves_the_guided_eps_and_keeps_each_halfs_variance(torch_head, head):
  x, z = rows(2, 6, C), rows(3, 6, CZ)
  ts = np.array([7, 7, 7, 7, 7, 7])
  want = torch_net_np(torch_head.net, x, ts, z, cfg=2.5)
  got = np.asarray(
    head.net.forward_with_cfg(jnp.asarray(x, jnp.float32), jnp.asarray(ts), jnp.asarray(z, jnp.float32), 2.5)
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got[:3, :C], got[3:, :C])


def test_a_fresh_head_outputs_zero_and_its_blocks_start_as_identities():
  head = make_head()
  out = head.net(jnp.ones((3, C)), jnp.array([0, 5, 999]), jnp.ones((3, CZ)))
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  for block in head.net.res_blocks:
    np.testing.assert_array_equal(np.asarray(block.ada_lin.kernel.get_value()), 0.0)
  np.testing.assert_array_equal(np.asarray(head.net.final_layer.ada_lin.kernel.get_value()), 0.0)
  std = float(np.std(np.asarray(head.net.time_embed.mlp_in.kernel.get_value())))
  assert 0.015 < std < 0.025  # normal(0.02), not xavier


# ----------------------------------------------------------------------------- loss


def test_token_losses_match_the_float64_hybrid_loss_with_the_torch_network(torch_head, head):
  n = 6
  x0, z, noise = np.clip(rows(4, n, C, 0.5), -1, 1), rows(5, n, CZ), rows(6, n, C)
  # One decoder-term row (t = 0): with a random network its likelihood mass is often below float32's
  # resolution (clamped at 1e-12, as officially); test_diffusion.py covers that term with a smooth model.
  t = np.array([0, 1, 3, 300, 700, 999])
  got = head.token_losses(
    jnp.asarray(x0, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32)
  )
  ref = RefSchedule()
  xt = ref.q_sample(x0, t, noise)
  want = ref_hybrid_loss(ref, torch_net_np(torch_head.net, xt, t, z), x0, t, noise)
  for name in ("mse", "vb", "loss"):
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_the_loss_is_the_masked_mean_of_the_token_losses_for_its_draws(head):
  n = 8
  target, z = jnp.asarray(rows(7, n, C, 0.5), jnp.float32), jnp.asarray(rows(8, n, CZ), jnp.float32)
  key = jax.random.key(4)
  mask = jnp.array([1, 0, 1, 1, 0, 0, 1, 0], jnp.float32)

  @nnx.jit
  def run(head):
    t, noise = head.draw_training_noise(key, n)
    return head.token_losses(target, z, t, noise)["loss"], head.loss(target, z, key, mask), head.loss(target, z, key)

  per_token, masked, unmasked = (np.asarray(a, np.float64) for a in run(head))
  m = np.asarray(mask, np.float64)
  np.testing.assert_allclose(masked, (per_token * m).sum() / m.sum(), rtol=1e-6)
  np.testing.assert_allclose(unmasked, per_token.mean(), rtol=1e-6)


def test_training_timesteps_are_drawn_uniformly_over_all_1000_steps(head):
  t, noise = head.draw_training_noise(jax.random.key(0), 200_000)
  t = np.asarray(t)
  assert t.min() == 0 and t.max() == 999
  counts = np.bincount(t, minlength=1000)
  assert counts.size == 1000 and counts.min() > 100  # about 200 each
  assert noise.shape == (200_000, C)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(sd):
  plain, remat = make_head(sd), make_head(sd, grad_checkpointing=True)
  target, z = jnp.asarray(rows(9, 5, C, 0.5), jnp.float32), jnp.asarray(rows(10, 5, CZ), jnp.float32)
  key = jax.random.key(1)

  @nnx.jit
  def value_and_grads(head):
    return nnx.value_and_grad(lambda h: h.loss(target, z, key))(head)

  (l1, g1), (l2, g2) = value_and_grads(plain), value_and_grads(remat)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), g1, g2)


def test_bfloat16_compute_stays_close_to_float32(sd, head):
  low = make_head(sd, dtype="bfloat16")
  x, z, ts = (
    jnp.asarray(rows(11, 4, C), jnp.float32),
    jnp.asarray(rows(12, 4, CZ), jnp.float32),
    jnp.array([1, 2, 3, 4]),
  )
  ref, got = (np.asarray(nnx.jit(lambda m: m.net(x, ts, z))(h)) for h in (head, low))
  assert got.dtype == np.float32
  assert np.max(np.abs(got - ref)) < 0.05 * np.max(np.abs(ref))
  assert not np.array_equal(got, ref)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_sampling_fn_equals_the_network_under_its_condition(sd, dtype):
  net = make_head(sd, dtype=dtype).net
  steps = gd.create_diffusion(str(STEPS), "cosine").timestep_map
  x, z = jnp.asarray(rows(30, 6, C), jnp.float32), jnp.asarray(rows(31, 6, CZ), jnp.float32)
  ts = jnp.asarray(np.asarray(steps)[[0, 3, 3, 5, STEPS - 1, 1]])  # one row per step, any order
  got = nnx.jit(lambda net, x, t, z: net.sampling_fn(z, steps)(x, t))(net, x, ts, z)
  want = nnx.jit(lambda net, x, t, z: net(x, t, z))(net, x, ts, z)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5 if dtype == "float32" else 2e-2, atol=1e-5)


# ----------------------------------------------------------------------------- sampling


def reference_sample(torch_head, z, key, temperature, cfg):
  """The official sampling procedure step by step in float64, with the same random draws."""
  n = z.shape[0]
  k_init, k_loop = jax.random.split(key)
  if cfg != 1.0:
    half = np.asarray(jax.random.normal(k_init, (n // 2, C), jnp.float32), np.float64)
    x = np.concatenate([half, half])  # one initial noise for both halves, not scaled by temperature
  else:
    x = np.asarray(jax.random.normal(k_init, (n, C), jnp.float32), np.float64)
  ref = RefSchedule(ref_kept_steps(STEPS))
  keys = gd.step_keys(k_loop, STEPS)
  for i, step in enumerate(range(STEPS - 1, -1, -1)):
    t = np.full(n, step)
    out = torch_net_np(torch_head.net, x, ref.kept[t], z, cfg=None if cfg == 1.0 else cfg)
    noise = np.asarray(jax.random.normal(keys[i], (n, C), jnp.float32), np.float64)
    x = ref_p_sample(ref, out, x, t, noise, temperature)
  return x


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_sampling_matches_the_official_procedure_step_by_step(torch_head, head, cfg):
  z = rows(13, 6, CZ)
  key = jax.random.key(5)
  got = nnx.jit(lambda h, z, k: h.sample(z, k, temperature=0.7, cfg=cfg))(head, jnp.asarray(z, jnp.float32), key)
  want = reference_sample(torch_head, z, key, 0.7, cfg)
  assert got.shape == (6, C)
  assert rel_err(got, want) < 1e-3


def test_a_traced_guidance_scale_takes_the_guided_path(head):
  z, key = jnp.asarray(rows(14, 4, CZ), jnp.float32), jnp.asarray(jax.random.key(6))
  eager = head.sample(z, key, cfg=2.0)
  traced = nnx.jit(lambda h, z, k, g: h.sample(z, k, cfg=g))(head, z, key, jnp.float32(2.0))
  assert rel_err(traced, eager) < 1e-4


def test_guidance_needs_an_even_batch_of_cond_and_uncond_rows(head):
  with pytest.raises(ValueError, match="even length"):
    head.sample(jnp.zeros((5, CZ)), jax.random.key(0), cfg=2.0)


def test_a_bad_number_of_sampling_steps_is_refused_when_the_head_is_built():
  with pytest.raises(ValueError, match="cannot divide a section of 1000 steps into 5000"):
    DiffLoss(C, CZ, DEPTH, WIDTH, "5000", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- converter


def test_the_plan_expects_exactly_the_official_keys_and_shapes():
  official = {f"diffloss.{k}": tuple(v.shape) for k, v in TorchDiffLoss(16, 1024, 3, 1024).state_dict().items()}
  plan = diffloss_entries("diffloss.", ("diffloss",), depth=3, width=1024, target_channels=16, z_channels=1024)
  assert {e.source_key: tuple(e.source_shape) for e in plan} == official
  assert all(e.target_path[0] == "diffloss" for e in plan)


def test_conversion_round_trips_every_tensor(sd, head):
  state = dict(nnx.to_flat_state(nnx.state(head, nnx.Param)))
  assert sum(np.size(v.get_value()) for v in state.values()) == sum(v.size for v in sd.values())
  w = sd["net.res_blocks.1.adaLN_modulation.1.weight"]  # (3W, W) -> kernel (W, 3W)
  np.testing.assert_array_equal(np.asarray(head.net.res_blocks[1].ada_lin.kernel.get_value()), w.T)
  np.testing.assert_array_equal(
    np.asarray(head.net.res_blocks[0].in_ln.scale.get_value()), sd["net.res_blocks.0.in_ln.weight"]
  )


def test_a_missing_key_is_named(sd, head):
  broken = dict(sd)
  del broken["net.final_layer.linear.bias"]
  with pytest.raises(ConversionError, match=r"missing 1 key\(s\):\s+net\.final_layer\.linear\.bias"):
    convert_diffloss_state_dict(broken, head)


def test_a_checkpoint_of_another_size_is_refused_naming_the_misshaped_keys(head):
  other = {k: v.detach().numpy() for k, v in TorchDiffLoss(C, CZ, DEPTH, 2 * WIDTH).state_dict().items()}
  with pytest.raises(ConversionError, match=r"net\.input_proj\.weight: has shape \(64, 4\), expected \(32, 4\)"):
    convert_diffloss_state_dict(other, head)
