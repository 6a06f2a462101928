"""Hi-MAR transformer (hmar_jax/models/himar.py) and its converter (hmar_jax/convert/himar.py).

The converted backbone is compared with tests/torch_ref_himar.py, a float64 PyTorch re-statement of the
official model that runs the whole [buffer | low-res | high-res] sequence and drops masked entries by
boolean indexing; the JAX model runs in float32 with the static-capacity gather (and leaves the always
masked high-res slots out of the stage-1 encoder), so features agree to float32 accuracy
(atol 1e-4, rtol 1e-4 on features of magnitude ~1; the observed error is ~1e-5).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from hmar_jax.convert.common import ConversionError
from hmar_jax.convert.himar import convert_himar_backbone_state_dict, convert_himar_diffloss_state_dict
from hmar_jax.models import himar
from hmar_jax.models.diffloss import DiffLoss
from tests.torch_ref_diffloss import randomized_torch_diffloss
from tests.torch_ref_himar import RefHiMAR

TOL = dict(atol=1e-4, rtol=1e-4)
B = 3


def tiny_config(**overrides):
  c = himar.himar_config("tiny")
  c.update(overrides)
  return c


@functools.cache
def reference_and_backbone(seed=0):
  config = tiny_config()
  ref = RefHiMAR(config).randomize(seed).double().eval()
  sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
  return config, ref, convert_himar_backbone_state_dict(sd, config)


def official_mask(num_masked, n, seed):
  """(B, n) float: num_masked positions per row, each row's own random order (official scatter of orders)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, n), np.float32)
  for r in range(B):
    mask[r, rng.permutation(n)[:num_masked]] = 1.0
  return mask


@functools.partial(nnx.jit, static_argnames=("capacity",))
def run_stage1(backbone, low, mask, labels, drop, *, capacity):
  return backbone.stage1(low, mask, labels, capacity=capacity, drop_labels=drop)


@functools.partial(nnx.jit, static_argnames=("capacity",))
def run_stage2(backbone, high, mask, labels, pivots, low, placeholder, drop, *, capacity):
  return backbone.stage2(
    high, mask, labels, pivots=pivots, low_res_tokens=low, placeholder=placeholder, capacity=capacity, drop_labels=drop
  )


def t(x, dtype=torch.float64):
  return torch.from_numpy(np.asarray(x)).to(dtype)


def data(config, seed):
  rng = np.random.default_rng(seed)
  s, n, w = himar.low_res_len(config), himar.high_res_len(config), config.cond_dim
  low = rng.standard_normal((B, s, w)).astype(np.float32)
  high = rng.standard_normal((B, n, w)).astype(np.float32)
  labels = rng.integers(0, config.class_num, B)
  drop = np.array([False, True, False])
  return low, high, labels, drop


def test_stage1_features_match_the_official_forward_at_two_mask_ratios_with_one_static_capacity():
  config, ref, backbone = reference_and_backbone()
  low, high, labels, drop = data(config, 1)
  s = himar.low_res_len(config)
  capacity = config.buffer_size + s - 2  # holds rows keeping up to 2 low-res tokens
  for num_masked, seed in ((2, 10), (3, 11)):
    mask = official_mask(num_masked, s, seed)
    got = run_stage1(backbone, low, mask, labels, drop, capacity=capacity)
    with torch.no_grad():
      want = ref.stage1(t(low), t(high), t(mask), t(labels, torch.long), torch.from_numpy(drop)).numpy()
    assert got.shape == (B, s, config.decoder_embed_dim)
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_stage2_features_from_pivots_with_placeholders_match_the_official_forward_at_two_mask_ratios():
  config, ref, backbone = reference_and_backbone()
  low, high, labels, drop = data(config, 2)
  s, n = himar.low_res_len(config), himar.high_res_len(config)
  rng = np.random.default_rng(3)
  pivots = rng.standard_normal((B, s, config.decoder_embed_dim)).astype(np.float32)
  placeholder = rng.random((B, s)) < 0.5
  capacity = config.buffer_size + s + n - 5  # holds rows keeping up to n - 5 high-res tokens
  for num_masked, seed in ((5, 20), (11, 21)):
    mask = official_mask(num_masked, n, seed)
    got = run_stage2(backbone, high, mask, labels, pivots, None, placeholder, drop, capacity=capacity)
    with torch.no_grad():
      want = ref.stage2(
        t(high),
        t(mask),
        t(labels, torch.long),
        pivots=t(pivots),
        placeholder=t(placeholder),
        drop=torch.from_numpy(drop),
      ).numpy()
    assert got.shape == (B, n, config.decoder_embed_dim)
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_stage2_features_from_known_low_res_tokens_match_the_official_forward():
  config, ref, backbone = reference_and_backbone()
  low, high, labels, _ = data(config, 4)
  s, n = himar.low_res_len(config), himar.high_res_len(config)
  mask = official_mask(7, n, 30)
  got = run_stage2(backbone, high, mask, labels, None, low, None, None, capacity=config.buffer_size + s + n)
  with torch.no_grad():
    want = ref.stage2(t(high), t(mask), t(labels, torch.long), low=t(low)).numpy()
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


@pytest.mark.parametrize("variant", ["base", "large", "huge"])
def test_official_variant_parameter_counts_equal_the_restatement(variant):
  config = himar.himar_config(variant)
  with torch.device("meta"):
    ref = RefHiMAR(config)
  abstract = nnx.eval_shape(lambda: himar.HiMARBackbone(config, rngs=nnx.Rngs(0)))
  assert himar.count_params(abstract) == sum(p.numel() for p in ref.parameters())
  assert abstract.mask_token.shape == (1, 2 * (64 + 256), config.encoder_embed_dim)  # 8 x 8 pivots, 16 x 16 tokens


def test_the_stage2_training_ratio_is_the_cosine_of_a_uniform_quarter_turn():
  config = tiny_config()
  keys = jax.random.split(jax.random.key(0), 4000)
  ratios = np.asarray(jax.vmap(lambda k: himar.stage2_mask_ratio(k, config))(keys), np.float64)
  assert ratios.min() >= 0.0 and ratios.max() <= 1.0
  # ratio = cos(pi r / 2) with r ~ U[0, 1)  <=>  r = 2 / pi * arccos(ratio) is uniform
  r = 2.0 / math.pi * np.arccos(ratios)
  assert scipy.stats.kstest(r, "uniform").pvalue > 1e-3


def test_the_stage2_ratio_without_cos_is_the_truncated_normal_above_0_38():
  config = tiny_config(cos=False)
  keys = jax.random.split(jax.random.key(1), 4000)
  ratios = np.asarray(jax.vmap(lambda k: himar.stage2_mask_ratio(k, config))(keys), np.float64)
  want = scipy.stats.truncnorm((0.38 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
  assert scipy.stats.kstest(ratios, want.cdf).pvalue > 1e-3


def test_training_masks_mask_the_drawn_count_and_fit_the_training_capacities():
  config = tiny_config()
  s, n = himar.low_res_len(config), himar.high_res_len(config)
  for i in range(20):
    m1 = np.asarray(himar.stage1_training_mask(jax.random.key(i), B, config))
    m2 = np.asarray(himar.stage2_training_mask(jax.random.key(100 + i), B, config))
    assert m1.shape == (B, s) and m2.shape == (B, n)
    assert len(set(m1.sum(1))) == 1 and len(set(m2.sum(1))) == 1  # one count per batch, as the official
    assert m1.sum(1)[0] >= math.ceil(s * config.mask_ratio_min) and m2.sum(1)[0] >= 1
    assert config.buffer_size + s - m1.sum(1).min() <= himar.stage1_training_capacity(config)
    assert config.buffer_size + s + n - m2.sum(1).min() <= himar.stage2_training_capacity(config)


@pytest.mark.parametrize("epoch", [0, 30, 100, 250])
def test_pivot_rows_drop_to_the_placeholder_with_the_warmup_schedule(epoch):
  config = tiny_config(step_warmup=100, step_stage2_rate=0.25)
  want = 1.0 - 0.25 * min(1.0, epoch / 100)
  assert float(himar.pivot_drop_prob(epoch, config)) == pytest.approx(want, abs=1e-7)
  all_seen = jnp.ones((4000, 4))  # every token masked in stage 1: only the row drop sets placeholders
  rows = np.asarray(himar.pivot_placeholder(jax.random.key(epoch), all_seen, epoch, config))
  assert (rows == rows[:, :1]).all()
  assert abs(rows[:, 0].mean() - want) < 0.03


def test_pivot_slots_whose_token_stage1_saw_take_the_placeholder():
  config = tiny_config(step_stage2_rate=1.0, step_warmup=1)  # after warm-up: no row is dropped
  stage1_mask = jnp.array([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]], jnp.float32)
  got = np.asarray(himar.pivot_placeholder(jax.random.key(0), stage1_mask, 5, config))
  np.testing.assert_array_equal(got, np.asarray(stage1_mask) == 0)


def test_the_converter_names_missing_and_unexpected_keys_and_ignores_both_heads():
  config, ref, _ = reference_and_backbone()
  sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
  heads = {"diffloss.net.input_proj.weight": np.zeros((2, 2), np.float32), "cond_diffloss.net.x": np.zeros(1)}
  convert_himar_backbone_state_dict({**sd, **heads}, config)  # the heads' keys are not the backbone's
  broken = dict(sd)
  del broken["encoder_blocks.1.adaLN_shift"]
  broken["encoder_blocks_ada.0.weight"] = np.zeros((4, 4), np.float32)
  with pytest.raises(ConversionError) as e:
    convert_himar_backbone_state_dict(broken, config, source_name="ckpt.pth")
  msg = str(e.value)
  assert "ckpt.pth" in msg and "encoder_blocks.1.adaLN_shift" in msg and "encoder_blocks_ada.0.weight" in msg


def test_a_mar_state_dict_is_refused_as_not_himar():
  config = tiny_config()
  mar_like = {"encoder_blocks.0.attn.qkv.weight": np.zeros((3, 3), np.float32)}
  with pytest.raises(ConversionError, match="looks like a MAR checkpoint"):
    convert_himar_backbone_state_dict(mar_like, config)


def test_the_stage1_head_converts_with_the_mar_diffloss_key_map_ignoring_the_other_keys():
  config, ref, _ = reference_and_backbone()
  head = randomized_torch_diffloss(config.cond_dim, config.decoder_embed_dim, config.diffloss_d, config.diffloss_w)
  sd = {f"diffloss.{k}": v.numpy() for k, v in head.state_dict().items()}
  sd.update({k: v.float().numpy() for k, v in ref.state_dict().items()})
  sd["cond_diffloss.net.x_embedder.proj.weight"] = np.zeros((2, 2), np.float32)
  state = convert_himar_diffloss_state_dict(sd, config)
  module = nnx.eval_shape(
    lambda: DiffLoss(
      config.cond_dim, config.decoder_embed_dim, config.diffloss_d, config.diffloss_w, "10", rngs=nnx.Rngs(0)
    )
  )
  graphdef, _, rest = nnx.split(module, nnx.Param, ...)
  net = nnx.merge(graphdef, state, rest).net
  rng = np.random.default_rng(6)
  x = rng.standard_normal((5, config.cond_dim)).astype(np.float32)
  steps = rng.integers(0, 1000, 5)
  z = rng.standard_normal((5, config.decoder_embed_dim)).astype(np.float32)
  with torch.no_grad():
    want = head.double().net(t(x), torch.from_numpy(steps), t(z)).numpy()
  np.testing.assert_allclose(np.asarray(net(x, steps, z)), want, **TOL)


def test_a_concrete_stage2_mask_keeping_more_tokens_than_the_capacity_is_refused():
  config, _, backbone = reference_and_backbone()
  low, high, labels, _ = data(config, 5)
  s, n = himar.low_res_len(config), himar.high_res_len(config)
  with pytest.raises(ValueError, match="keeps 24 tokens"):
    backbone.stage2(high, np.zeros((B, n)), labels, low_res_tokens=low, capacity=config.buffer_size + s + n - 1)


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(decoder_embed_dim=128, decoder_num_heads=4), "decoder_embed_dim"),
    (dict(cond_dim=8), "cond_dim"),
    (dict(step_warmup=0), "step_warmup"),
    (dict(encoder_num_heads=5), "encoder_num_heads"),
  ],
)
def test_bad_configs_are_refused_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"Hi-MAR config: .*{field}"):
    himar.HiMARBackbone(tiny_config(**overrides), rngs=nnx.Rngs(0))


def test_every_parameter_has_one_logical_name_per_dimension_none_repeated():
  _, _, backbone = reference_and_backbone()
  for path, var in nnx.to_flat_state(nnx.state(backbone, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path
    used = [n for n in names if n is not None]
    assert len(set(used)) == len(used), (path, names)


def test_bfloat16_compute_stays_close_to_float32_and_returns_float32():
  config, _, backbone = reference_and_backbone()
  half = himar.HiMARBackbone(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(half, nnx.state(backbone, nnx.Param))
  low, _, labels, drop = data(config, 1)
  mask = official_mask(2, himar.low_res_len(config), 10)
  full = np.asarray(run_stage1(backbone, low, mask, labels, drop, capacity=config.buffer_size + 2))
  got = run_stage1(half, low, mask, labels, drop, capacity=config.buffer_size + 2)
  assert got.dtype == jnp.float32
  err = np.abs(np.asarray(got) - full).mean()
  assert 0 < err < 0.03  # bfloat16 rounding shows (the option is used) but stays small
