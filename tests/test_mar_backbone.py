"""MAR backbone (hmar_jax/models/mar.py) and its converter (hmar_jax/convert/mar.py).

The converted backbone is compared with tests/torch_ref_mar.py, a float64 PyTorch re-statement of
the official encoder / decoder that drops the masked tokens with boolean indexing; the JAX model
runs in float32 with the static-capacity gather, so outputs agree to float32 accuracy (atol 2e-4,
rtol 2e-4 on z of magnitude ~1).
"""

import functools
import math
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx
from jaxpr_helpers import count_equations

from hmar_jax.convert.common import ConversionError
from hmar_jax.convert.mar import convert_mar_backbone_state_dict, mar_backbone_entries
from hmar_jax.models import mar
from tests.torch_ref_mar import RefMAR

TOL = dict(atol=2e-4, rtol=2e-4)
B = 3


def tiny_config(**overrides):
  c = mar.mar_config("tiny")
  c.update(overrides)
  return c


def reference_and_backbone(config, seed=0):
  ref = RefMAR(config).randomize(seed).double().eval()
  sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
  return ref, convert_mar_backbone_state_dict(sd, config)


def inputs(config, seed):
  rng = np.random.default_rng(seed)
  n, t = mar.seq_len(config), mar.token_embed_dim(config)
  tokens = rng.standard_normal((B, n, t)).astype(np.float32)
  labels = rng.integers(0, config.class_num, B)
  return tokens, labels


def official_mask(num_masked, n, seed):
  """(B, n) float: num_masked positions per row, each row's own random order (as random_masking)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, n), np.float32)
  for r in range(B):
    mask[r, rng.permutation(n)[:num_masked]] = 1.0
  return mask


@functools.partial(nnx.jit, static_argnames=("capacity",))
def run(backbone, tokens, mask, labels, *, capacity, key=None, drop_labels=None):
  """The backbone under jit (eager op-by-op runs are slow on CPU)."""
  return backbone(tokens, mask, labels, key=key, capacity=capacity, drop_labels=drop_labels)


def train_key(seed):
  # rbg keys compile much faster than threefry on CPU; the model code is the same for both.
  return jax.random.key(seed, impl="unsafe_rbg")


def torch_z(ref, tokens, mask, labels, drop=None):
  with torch.no_grad():
    z = ref(
      torch.from_numpy(tokens).double(),
      torch.from_numpy(mask).double(),
      torch.from_numpy(labels).long(),
      None if drop is None else torch.from_numpy(drop),
    )
  return z.numpy()


def test_z_matches_the_official_forward_at_two_mask_ratios_with_one_static_capacity():
  config = tiny_config()
  ref, backbone = reference_and_backbone(config)
  capacity = mar.training_capacity(config)
  n = mar.seq_len(config)
  tokens, labels = inputs(config, 1)
  # 12 of 16 masked fills the capacity exactly; 15 of 16 leaves 3 padding slots that must not leak.
  for num_masked in (12, 15):
    mask = official_mask(num_masked, n, num_masked)
    z = run(backbone, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels), capacity=capacity)
    np.testing.assert_allclose(np.asarray(z), torch_z(ref, tokens, mask, labels), **TOL)


def test_z_under_jit_with_full_capacity_matches_the_official_forward():
  config = tiny_config()
  ref, backbone = reference_and_backbone(config, seed=3)
  n = mar.seq_len(config)
  tokens, labels = inputs(config, 2)
  mask = official_mask(5, n, 7)
  fn = nnx.jit(lambda m, t, k, y: m(t, k, y, capacity=config.buffer_size + n))
  z = fn(backbone, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(z), torch_z(ref, tokens, mask, labels), **TOL)


def test_dropped_labels_use_the_fake_latent():
  config = tiny_config()
  ref, backbone = reference_and_backbone(config, seed=4)
  tokens, labels = inputs(config, 3)
  mask = official_mask(12, mar.seq_len(config), 1)
  drop = np.array([True, False, True])
  z = run(backbone, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels), capacity=8, drop_labels=drop)
  np.testing.assert_allclose(np.asarray(z), torch_z(ref, tokens, mask, labels, drop), **TOL)


def test_training_label_drop_with_probability_one_gives_the_fake_latent_on_every_row():
  config = tiny_config(label_drop_prob=0.999999, attn_dropout=0.0, proj_dropout=0.0)
  _, backbone = reference_and_backbone(config, seed=5)
  tokens, labels = inputs(config, 4)
  mask = jnp.asarray(official_mask(12, mar.seq_len(config), 2))
  trained = run(backbone, jnp.asarray(tokens), mask, jnp.asarray(labels), key=train_key(0), capacity=8)
  unconditional = run(backbone, jnp.asarray(tokens), mask, None, capacity=8)
  np.testing.assert_allclose(np.asarray(trained), np.asarray(unconditional), atol=1e-6)


def test_dropout_acts_only_when_a_key_is_given():
  config = tiny_config(label_drop_prob=0.0)
  _, backbone = reference_and_backbone(config, seed=6)
  tokens, labels = inputs(config, 5)
  args = (jnp.asarray(tokens), jnp.asarray(official_mask(12, mar.seq_len(config), 3)), jnp.asarray(labels))
  evaluation = run(backbone, *args, capacity=8)
  training = run(backbone, *args, key=train_key(1), capacity=8)
  assert np.max(np.abs(np.asarray(training) - np.asarray(evaluation))) > 1e-2
  backbone_nodrop = convert_mar_backbone_state_dict(
    _state_dict(backbone),
    tiny_config(label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0),
  )
  np.testing.assert_allclose(
    np.asarray(run(backbone_nodrop, *args, key=train_key(1), capacity=8)), np.asarray(evaluation), atol=1e-6
  )


def _state_dict(backbone):
  """The official state_dict of a backbone, by inverting the converter's plan."""
  flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(backbone, nnx.Param))}
  out = {}
  for e in mar_backbone_entries(backbone.config):
    x = np.asarray(flat[e.target_path])
    out[e.source_key] = x.T if e.target_path[-1] == "kernel" else x
  return out


def test_gradient_checkpointing_changes_neither_z_nor_gradients():
  config = tiny_config(encoder_depth=2, decoder_depth=3)
  _, plain = reference_and_backbone(config, seed=7)
  remat_config = tiny_config(encoder_depth=2, decoder_depth=3, grad_checkpointing=True)
  remat = convert_mar_backbone_state_dict(_state_dict(plain), remat_config)
  tokens, labels = inputs(config, 6)
  mask = jnp.asarray(official_mask(13, mar.seq_len(config), 4))

  def loss(model):
    z = model(jnp.asarray(tokens), mask, jnp.asarray(labels), key=train_key(2), capacity=8)
    return jnp.mean(jnp.square(z))

  (l1, g1), (l2, g2) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (plain, remat))
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  g1, g2 = nnx.to_pure_dict(g1), nnx.to_pure_dict(g2)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g1))
  chex.assert_trees_all_close(g1, g2, atol=1e-5 * scale, rtol=0)


def test_the_blocks_are_traced_once_whatever_the_depth():
  """Each block stack runs as one scan: a deeper backbone traces (and compiles) no more matmuls."""

  def dots(depth):
    config = tiny_config(encoder_depth=depth, decoder_depth=depth)
    model = nnx.eval_shape(lambda: mar.MARBackbone(config, rngs=nnx.Rngs(0)))
    tokens, labels = inputs(config, 0)
    mask = jnp.zeros((B, mar.seq_len(config)), bool)
    capacity = config.buffer_size + mar.seq_len(config)

    def run(state, mask):  # the mask traced too: no concrete check of it
      model_ = nnx.merge(nnx.graphdef(model), state)
      return model_(jnp.asarray(tokens), mask, jnp.asarray(labels), capacity=capacity)

    return count_equations(jax.make_jaxpr(run)(nnx.state(model), mask).jaxpr, ("dot_general",))

  assert dots(1) == dots(6)


def test_a_concrete_mask_keeping_more_tokens_than_the_capacity_is_refused():
  config = tiny_config()
  _, backbone = reference_and_backbone(config)
  tokens, labels = inputs(config, 7)
  mask = jnp.asarray(official_mask(10, mar.seq_len(config), 5))  # keeps 6 > capacity 8 - buffer 4
  with pytest.raises(ValueError, match="keeps 6 tokens but capacity 8"):
    backbone(jnp.asarray(tokens), mask, jnp.asarray(labels), capacity=8)


@pytest.mark.parametrize("variant", ["base", "large", "huge"])
def test_official_variant_shapes_and_parameter_counts_match_the_official_model(variant):
  config = mar.mar_config(variant)
  with torch.device("meta"):
    ref = RefMAR(config)
  official = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  plan = {e.source_key: tuple(e.source_shape) for e in mar_backbone_entries(config)}
  assert plan == official
  abstract = nnx.eval_shape(lambda: mar.MARBackbone(config, rngs=nnx.Rngs(0)))
  assert mar.count_params(abstract) == sum(p.numel() for p in ref.parameters())


def test_the_converter_names_missing_and_unexpected_keys_and_ignores_the_diffusion_head():
  config = tiny_config()
  with torch.device("meta"):
    ref = RefMAR(config)
  sd = {k: np.zeros(v.shape, np.float32) for k, v in ref.state_dict().items()}
  sd["diffloss.net.input_proj.weight"] = np.zeros((64, 16), np.float32)
  convert_mar_backbone_state_dict(sd, config)  # the head's keys are not the backbone's business
  del sd["decoder_blocks.1.attn.qkv.bias"]
  sd["encoder_blocks.2.norm1.weight"] = np.zeros(64, np.float32)
  with pytest.raises(ConversionError, match=r"(?s)missing 1.*decoder_blocks\.1\.attn\.qkv\.bias.*unexpected 1.*"):
    convert_mar_backbone_state_dict(sd, config)


def test_the_mask_ratio_stays_in_its_interval_and_follows_the_official_truncated_normal():
  ratios = np.asarray(jax.vmap(lambda k: mar.mask_ratio(k, 0.7))(jax.random.split(jax.random.key(0), 20000)))
  assert ratios.min() >= np.float32(0.7) and ratios.max() <= 1.0
  official = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
  assert abs(ratios.mean() - official.mean()) < 4 * official.std() / np.sqrt(ratios.size)
  assert abs(ratios.std() - official.std()) < 0.02 * official.std()


@pytest.mark.parametrize("img_size, ratio_min", [(64, 0.7), (256, 0.7), (160, 0.7), (80, 0.75), (48, 0.5)])
def test_masks_drawn_with_the_training_ratio_always_fit_the_training_capacity(img_size, ratio_min):
  config = tiny_config(img_size=img_size, mask_ratio_min=ratio_min)
  n, room = mar.seq_len(config), mar.training_capacity(config) - config.buffer_size
  assert room == n - math.ceil(Fraction(n) * Fraction(str(ratio_min)))  # the official bound, exactly
  ratios = jax.vmap(lambda k: mar.mask_ratio(k, ratio_min))(jax.random.split(jax.random.key(1), 4000))
  ratios = jnp.concatenate([ratios, jnp.array([np.float32(ratio_min), 1.0], jnp.float32)])
  kept = n - np.asarray(jax.vmap(lambda r: mar.num_masked_tokens(r, n))(ratios))
  assert kept.max() <= room and kept.min() == 0


def test_random_mask_masks_exactly_num_masked_per_row_first_in_each_order():
  orders = mar.sample_orders(jax.random.key(3), 5, 37)
  assert sorted(np.asarray(orders)[2].tolist()) == list(range(37))
  mask = np.asarray(jax.jit(mar.random_mask)(orders, jnp.int32(29)))
  np.testing.assert_array_equal(mask.sum(axis=1), 29)
  for row, order in zip(mask, np.asarray(orders)):
    assert row[order[:29]].all() and not row[order[29:]].any()


def test_mask_by_order_with_a_traced_length_equals_the_official_scatter():
  orders = np.asarray(mar.sample_orders(jax.random.key(4), 4, 20))
  for mask_len in (1, 7, 19):
    official = torch.zeros(4, 20).scatter(-1, torch.tensor(orders[:, :mask_len]).long(), torch.ones(4, 20)).bool()
    got = jax.jit(mar.mask_by_order)(jnp.int32(mask_len), jnp.asarray(orders))
    np.testing.assert_array_equal(np.asarray(got), official.numpy())


@pytest.mark.parametrize("p", [1, 2])
def test_patchify_follows_the_official_channel_order_and_unpatchify_inverts_it(p):
  rng = np.random.default_rng(p)
  latents = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)  # NHWC
  x = torch.from_numpy(latents).permute(0, 3, 1, 2)  # the official NCHW
  official = torch.einsum("nchpwq->nhwcpq", x.reshape(2, 3, 8 // p, p, 8 // p, p)).reshape(2, (8 // p) ** 2, 3 * p * p)
  tokens = mar.patchify(jnp.asarray(latents), p)
  np.testing.assert_array_equal(np.asarray(tokens), official.numpy())
  np.testing.assert_array_equal(np.asarray(mar.unpatchify(tokens, p, 8 // p, 8 // p)), latents)


def test_bad_configs_are_refused_naming_the_field():
  with pytest.raises(ValueError, match="encoder_embed_dim 64 is not divisible by encoder_num_heads 5"):
    mar.MARBackbone(tiny_config(encoder_num_heads=5), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="MAR variant must be one of"):
    mar.mar_config("giant")
