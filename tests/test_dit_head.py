"""Hi-MAR's stage-2 diffusion-transformer head (hmar_jax.models.dit_head) and its converter, against a
PyTorch re-statement of the official DiT (tests/torch_ref_dit_head.py) with random weights converted
by hmar_jax.convert.dit_head, and float64 NumPy diffusion references on the official NCHW layout.

Tolerances: the network in float32 against torch float64, 2e-5 relative to the output's largest
magnitude (outputs of order 1, full attention over 16 tokens); the position table 1e-6 (float32
rounding of values in [-1, 1]); losses rtol 1e-4; one reverse step 1e-4 relative to the sample's
magnitude; whole sample loops (5 respaced steps, whose first step amplifies float32 rounding by up to
1 / sqrt(alpha_bar) ~ 2e4 before the posterior mean cancels most of it) 3e-4 relative to each
element's magnitude (measured: 3e-5).
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
from torch_ref_diffloss import RefSchedule, ref_kept_steps  # noqa: E402
from torch_ref_dit_head import (  # noqa: E402
  randomized_torch_head,
  ref_fixed_large_step,
  ref_masked_mse,
  ref_pos_embed_2d,
  ref_q_sample,
  ref_replace_known,
)

from hmar_jax.convert.common import ConversionError  # noqa: E402
from hmar_jax.convert.dit_head import convert_dit_head_state_dict, dit_head_entries  # noqa: E402
from hmar_jax.models import diffusion as gd  # noqa: E402
from hmar_jax.models.dit_head import (  # noqa: E402
  DiTHead,
  p_sample_fixed_large,
  replace_known,
  sincos_pos_embed_2d,
)
from hmar_jax.parallel.partitioning import FSDP_TP_RULES  # noqa: E402

C, CZ, DEPTH, WIDTH, HEADS, GRID, STEPS = 4, 12, 2, 32, 4, 4, 5
L = GRID * GRID
SIZES = dict(c=C, cz=CZ, depth=DEPTH, width=WIDTH, heads=HEADS, mlp_ratio=4.0, grid=GRID)
HEAD_KW = dict(
  target_channels=C, z_channels=CZ, depth=DEPTH, width=WIDTH, num_heads=HEADS, grid_size=GRID, num_sampling_steps=STEPS
)


@pytest.fixture(scope="module")
def torch_head():
  return randomized_torch_head(seed=0, **SIZES)


@pytest.fixture(scope="module")
def sd(torch_head):
  return {k: v.detach().numpy().copy() for k, v in torch_head.state_dict().items()}


def make_head(sd=None, **kw) -> DiTHead:
  head = DiTHead(**HEAD_KW, rngs=nnx.Rngs(0), **kw)
  if sd is not None:
    nnx.update(head, convert_dit_head_state_dict(sd, head))
  return head


@pytest.fixture(scope="module")
def head(sd):
  return make_head(sd)


def to_nchw(x):
  """(N, L, C) tokens, row-major over the grid -> (N, C, H, W)."""
  x = np.asarray(x, np.float64)
  return x.transpose(0, 2, 1).reshape(x.shape[0], x.shape[2], GRID, GRID)


def to_tokens(x):
  return np.asarray(x).reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)


def torch_eps(torch_head, x_tokens, ts, z_tokens, cfg=None):
  """The torch network in float64 on token-layout NumPy inputs; returns NCHW."""
  net = torch_head.net.double()
  args = (torch.tensor(to_nchw(x_tokens)), torch.tensor(np.asarray(ts)), None, torch.tensor(to_nchw(z_tokens)))
  with torch.no_grad():
    out = net(*args) if cfg is None else net.forward_with_cfg(*args, cfg)
  torch_head.float()
  return out.numpy()


def randn(seed, *shape, scale=1.0):
  return np.random.default_rng(seed).standard_normal(shape) * scale


def max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def elementwise_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want) / (np.abs(want) + 1e-3 * np.abs(want).max())))


# ----------------------------------------------------------------------------- the network


def test_network_matches_torch_dit_on_converted_random_weights(head, torch_head):
  x, z = randn(1, 3, L, C), randn(2, 3, L, CZ)
  ts = np.array([0, 417, 999])
  got = head.net(jnp.asarray(x, jnp.float32), jnp.asarray(ts, jnp.int32), jnp.asarray(z, jnp.float32))
  want = torch_eps(torch_head, x, ts, z)
  assert got.shape == (3, L, C)
  assert max_rel(to_nchw(got), want) < 2e-5


def test_guided_network_output_matches_torch_forward_with_cfg(head, torch_head):
  x, z = randn(3, 4, L, C), randn(4, 4, L, CZ)
  ts = np.array([250, 250, 250, 250])
  got = head.net.forward_with_cfg(jnp.asarray(x, jnp.float32), jnp.asarray(ts), jnp.asarray(z, jnp.float32), 2.5)
  want = torch_eps(torch_head, x, ts, z, cfg=2.5)
  assert max_rel(to_nchw(got), want) < 2e-5


def test_bfloat16_compute_stays_close_to_float32(sd, head):
  x, z = randn(5, 2, L, C), randn(6, 2, L, CZ)
  args = (jnp.asarray(x, jnp.float32), jnp.asarray([10, 900]), jnp.asarray(z, jnp.float32))
  bf16 = make_head(sd, dtype=jnp.bfloat16)
  apply = nnx.jit(lambda h, x, t, z: h.net(x, t, z))
  got, want = apply(bf16, *args), apply(head, *args)
  assert got.dtype == jnp.float32
  assert 0 < max_rel(got, want) < 5e-2


def test_position_table_matches_float64_formula():
  got = sincos_pos_embed_2d(WIDTH, 16)
  assert got.shape == (256, WIDTH) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref_pos_embed_2d(WIDTH, 16), rtol=0, atol=1e-6)


def test_parameters_carry_known_distinct_logical_axis_names(head):
  known = {name for name, _ in FSDP_TP_RULES}
  for path, spec in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(head, nnx.Param))):
    names = [n for n in spec.get_value() if n is not None]
    assert len(names) == len(set(names)), path
    assert set(names) <= known, path


# ----------------------------------------------------------------------------- the loss


def test_training_loss_for_fixed_steps_and_noise_matches_reference(head, torch_head):
  target, z, noise = randn(7, 4, L, C), randn(8, 4, L, CZ), randn(9, 4, L, C)
  mask = np.random.default_rng(10).random((4, L)) < 0.6
  ts = np.array([0, 3, 500, 999])
  got = head.losses(
    jnp.asarray(target, jnp.float32),
    jnp.asarray(z, jnp.float32),
    jnp.asarray(mask),
    jnp.asarray(ts, jnp.int32),
    jnp.asarray(noise, jnp.float32),
  )
  sched = RefSchedule()
  x_t = ref_q_sample(sched, to_nchw(target), ts, to_nchw(noise))
  eps = torch_eps(torch_head, to_tokens(x_t), ts, z)
  want = ref_masked_mse(eps, to_nchw(noise), mask.reshape(4, GRID, GRID))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_loss_is_the_batch_mean_of_the_per_image_losses_at_its_draws(head):
  target, z = jnp.asarray(randn(11, 3, L, C), jnp.float32), jnp.asarray(randn(12, 3, L, CZ), jnp.float32)
  mask = jnp.asarray(np.random.default_rng(13).random((3, L)) < 0.5)
  key = jax.random.key(3)
  t, noise = head.draw_training_noise(key, 3)
  want = np.asarray(head.losses(target, z, mask, t, noise)).mean()
  np.testing.assert_allclose(float(head.loss(target, z, mask, key)), want, rtol=1e-6)


def test_loss_refuses_a_sequence_length_other_than_the_grid(head):
  with pytest.raises(ValueError, match=r"target must have shape \('N', 16, 4\)"):
    head.loss(jnp.zeros((2, 15, C)), jnp.zeros((2, 15, CZ)), jnp.ones((2, 15)), jax.random.key(0))


# ----------------------------------------------------------------------------- sampling


def test_default_sampler_respaces_to_the_official_250_steps():
  d = DiTHead(C, CZ, 1, WIDTH, HEADS, grid_size=GRID, rngs=nnx.Rngs(0)).gen_diffusion
  np.testing.assert_array_equal(d.timestep_map, ref_kept_steps(250))


@pytest.mark.parametrize("step", [0, 2, STEPS - 1])
def test_one_reverse_step_with_known_token_replacement_matches_reference(head, torch_head, step):
  n = 3
  x, z, known, init, noise = (
    randn(20, n, L, C),
    randn(21, n, L, CZ),
    randn(22, n, L, C),
    randn(23, n, L, C),
    randn(24, n, L, C),
  )
  keep = np.random.default_rng(25).random((n, L)) < 0.4
  d = head.gen_diffusion
  t = jnp.full((n,), step, jnp.int32)
  replaced = replace_known(
    d,
    jnp.asarray(x, jnp.float32),
    t,
    jnp.asarray(known, jnp.float32),
    jnp.asarray(keep),
    jnp.asarray(init, jnp.float32),
  )
  zj = jnp.asarray(z, jnp.float32)
  got = p_sample_fixed_large(d, lambda xx, ts: head.net(xx, ts, zj), replaced, t, jnp.asarray(noise, jnp.float32), 0.8)

  sched = RefSchedule(ref_kept_steps(STEPS))
  ts = np.full((n,), step)
  img = ref_replace_known(sched, to_nchw(x), ts, to_nchw(known), ~keep.reshape(n, GRID, GRID), to_nchw(init))
  eps = torch_eps(torch_head, to_tokens(img), sched.kept[ts], z)
  want = ref_fixed_large_step(sched, eps, img, ts, to_nchw(noise), 0.8)
  assert max_rel(to_nchw(replaced), img) < 1e-6
  assert max_rel(to_nchw(got["sample"]), want) < 1e-4


def reference_loop(torch_head, z, key, known, keep, temperature, cfg):
  """The official p_sample_loop with tokens / mask, step by step in float64, drawing the same normals
  as DiTHead.sample (k_init, k_loop = split(key); x_T from k_init; step i from step_keys(k_loop, T)[i])."""
  n = z.shape[0]
  sched = RefSchedule(ref_kept_steps(STEPS))
  k_init, k_loop = jax.random.split(key)
  if cfg is None:
    init = np.asarray(jax.random.normal(k_init, (n, L, C)), np.float64)
  else:
    half = np.asarray(jax.random.normal(k_init, (n // 2, L, C)), np.float64)
    init = np.concatenate([half, half])
  keys = gd.step_keys(k_loop, STEPS)
  img, init_nchw = to_nchw(init), to_nchw(init)
  mask = ~keep.reshape(n, GRID, GRID)
  for i, step in enumerate(range(STEPS - 1, -1, -1)):
    ts = np.full((n,), step)
    img = ref_replace_known(sched, img, ts, to_nchw(known), mask, init_nchw)
    eps = torch_eps(torch_head, to_tokens(img), sched.kept[ts], z, cfg=cfg)
    noise = to_nchw(np.asarray(jax.random.normal(keys[i], (n, L, C)), np.float64))
    img = ref_fixed_large_step(sched, eps, img, ts, noise, temperature)
  return img


def test_sampling_with_known_tokens_matches_the_official_loop_step_by_step(head, torch_head):
  n = 2
  z, known = randn(30, n, L, CZ), randn(31, n, L, C)
  keep = np.random.default_rng(32).random((n, L)) < 0.5
  key = jax.random.key(7)
  got = head.sample(
    jnp.asarray(z, jnp.float32), key, known=jnp.asarray(known, jnp.float32), keep=jnp.asarray(keep), temperature=0.7
  )
  want = reference_loop(torch_head, z, key, known, keep, 0.7, None)
  assert elementwise_rel(to_nchw(got), want) < 3e-4


def test_guided_sampling_under_jit_matches_the_official_cfg_loop(head, torch_head):
  b = 2
  z = np.concatenate([randn(40, b, L, CZ), randn(41, b, L, CZ)])  # [cond; uncond]
  known = np.concatenate([randn(42, b, L, C)] * 2)
  keep = np.concatenate([np.random.default_rng(43).random((b, L)) < 0.3] * 2)
  key = jax.random.key(9)

  @nnx.jit
  def run(h, z, known, keep, cfg):
    return h.sample(z, key, known=known, keep=keep, temperature=1.0, cfg=cfg)

  got = run(head, jnp.asarray(z, jnp.float32), jnp.asarray(known, jnp.float32), jnp.asarray(keep), jnp.float32(3.0))
  want = reference_loop(torch_head, z, key, known, keep, 1.0, 3.0)
  assert got.shape == (2 * b, L, C)
  assert elementwise_rel(to_nchw(got), want) < 3e-4


def test_sampling_without_known_tokens_uses_no_replacement(head, torch_head):
  z = randn(50, 2, L, CZ)
  key = jax.random.key(11)
  got = head.sample(jnp.asarray(z, jnp.float32), key)
  # nothing is kept: the official loop with an all-True mask never replaces anything
  want = reference_loop(torch_head, z, key, np.zeros((2, L, C)), np.zeros((2, L), bool), 1.0, None)
  assert elementwise_rel(to_nchw(got), want) < 3e-4


def test_sampling_needs_known_and_keep_together(head):
  with pytest.raises(ValueError, match="both known"):
    head.sample(jnp.zeros((2, L, CZ)), jax.random.key(0), known=jnp.zeros((2, L, C)))


def test_guided_sampling_refuses_an_odd_batch(head):
  with pytest.raises(ValueError, match="even length"):
    head.sample(jnp.zeros((3, L, CZ)), jax.random.key(0), cfg=2.0)


# ----------------------------------------------------------------------------- the converter


def test_converter_round_trip_restores_every_official_parameter(sd, head):
  prefixed = {f"cond_diffloss.{k}": v for k, v in sd.items()}
  state = convert_dit_head_state_dict(prefixed, head, src_prefix="cond_diffloss.")
  leaves = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
  back = {}
  for e in dit_head_entries("cond_diffloss.", (), depth=DEPTH, width=WIDTH, target_channels=C, z_channels=CZ):
    leaf = leaves[e.target_path]
    if len(e.source_shape) == 4:  # 1x1 conv: kernel (I, O) -> weight (O, I, 1, 1)
      back[e.source_key] = leaf.T[:, :, None, None]
    elif len(e.source_shape) == 2:
      back[e.source_key] = leaf.T
    else:
      back[e.source_key] = leaf
  buffers = {"cond_diffloss.net.pos_embed", "cond_diffloss.net.c_pos_embed"}
  assert set(back) | buffers == set(prefixed)
  for k, v in back.items():
    np.testing.assert_array_equal(v, prefixed[k], err_msg=k)


def test_converter_names_a_missing_key(sd, head):
  broken = dict(sd)
  del broken["net.blocks.1.attn.qkv.bias"]
  with pytest.raises(ConversionError, match=r"net\.blocks\.1\.attn\.qkv\.bias"):
    convert_dit_head_state_dict(broken, head)


def test_converter_refuses_a_position_table_with_rows_and_columns_swapped(sd, head):
  swapped = dict(sd)
  table = ref_pos_embed_2d(WIDTH, GRID)
  swapped["net.pos_embed"] = np.concatenate([table[:, WIDTH // 2 :], table[:, : WIDTH // 2]], 1)[None].astype(
    np.float32
  )
  with pytest.raises(ConversionError, match=r"net\.pos_embed is not the fixed 2-D sin-cos table"):
    convert_dit_head_state_dict(swapped, head)
