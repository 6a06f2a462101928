"""Invariants of the multi-scale residual quantizer (hmar_jax.tokenizer.quantizer).

Runs the official 256 px quantizer (V = 4096, Cvae = 32, patch_nums 1..16, 4 shared phis) on
random features; parameters are filled from NumPy (no random-init compiles). Parity with the
official PyTorch code is in test_vqvae.py.
"""

from __future__ import annotations

import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs.vqvae import get_config  # noqa: E402
from hmar_jax.tokenizer.quantizer import MultiScaleQuantizer, check_patch_nums, phi_assignment  # noqa: E402
from hmar_jax.tokenizer.resize import area_resize, bicubic_matrix  # noqa: E402

B = 2


def make_quantizer(config, seed=0, phi_noise=0.05, **overrides) -> MultiScaleQuantizer:
  """The config's quantizer with phi convs = identity + noise and a codebook of random
  directions whose norms spread log-uniformly over [0.01, 20] (like a trained codebook, it
  can approximate both the large coarse residuals and the small fine ones)."""
  kw = dict(
    vocab_size=config.vocab_size,
    z_channels=config.z_channels,
    patch_nums=config.patch_nums,
    beta=config.beta,
    quant_resi=config.quant_resi,
    share_quant_resi=config.share_quant_resi,
  )
  kw.update(overrides)
  q = nnx.eval_shape(lambda: MultiScaleQuantizer(**kw, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(q)

  def fill(path, s):
    if path[-1] == "kernel":  # (3, 3, C, C): a centred delta plus noise
      k = rng.normal(0, phi_noise, s.shape)
      k[1, 1] += np.eye(s.shape[-1])
      return jnp.asarray(k, s.dtype)
    if path[-1] == "embedding":
      d = rng.normal(0, 1, s.shape)
      d /= np.linalg.norm(d, axis=-1, keepdims=True)
      return jnp.asarray(d * np.exp(rng.uniform(np.log(0.01), np.log(20), (s.shape[0], 1))), s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  state = nnx.map_state(lambda p, v: v.replace(fill(p, v.get_value())), state)
  return nnx.merge(graphdef, state)


def smooth_features(config, seed=1) -> jax.Array:
  """(B, h, w, C) features with energy at every scale (coarse structure plus finer detail)."""
  rng = np.random.default_rng(seed)
  side, c = config.patch_nums[-1], config.z_channels
  f = np.zeros((B, side, side, c), np.float32)
  for k, pn in enumerate(config.patch_nums):
    coarse = rng.normal(0, 0.8**k, (B, pn, pn, c))
    m = bicubic_matrix(pn, side)
    f += np.einsum("ih,jw,bhwc->bijc", m, m, coarse).astype(np.float32)
  return jnp.asarray(f)


@pytest.fixture(scope="module")
def cfg():
  return get_config()  # official 256 px


@pytest.fixture(scope="module")
def quantizer(cfg):
  return make_quantizer(cfg)


@pytest.fixture(scope="module")
def encoded(quantizer, cfg):
  f = smooth_features(cfg)
  indices, f_hat = nnx.jit(lambda q, f: q.encode(f))(quantizer, f)  # one compile, not one per op
  return f, indices, f_hat


# ----------------------------------------------------------------------------- structure


def test_phi_choice_per_scale_is_the_official_nearest_tick():
  # official PhiPartiallyShared, K = 4: ticks linspace(1/12, 11/12, 4), scale si at si / (S - 1)
  assert phi_assignment(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert phi_assignment(14, 4) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
  assert phi_assignment(10, 1) == (0,) * 10  # fully shared
  assert phi_assignment(10, 0) == tuple(range(10))  # one phi per scale


def test_indices_have_scale_shapes_and_lie_in_the_codebook(encoded, cfg):
  _, indices, _ = encoded
  assert [i.shape for i in indices] == [(B, pn, pn) for pn in cfg.patch_nums]
  for idx in indices:
    assert idx.dtype == jnp.int32
    assert int(idx.min()) >= 0 and int(idx.max()) < cfg.vocab_size


def test_nearest_lookup_is_the_l2_argmin(quantizer, cfg):
  rng = np.random.default_rng(5)
  z = rng.normal(0, 1, (64, cfg.z_channels)).astype(np.float32)
  e = np.asarray(quantizer.embedding.embedding[...], np.float64)
  d = ((z[:, None, :].astype(np.float64) - e[None]) ** 2).sum(-1)  # float64 reference
  np.testing.assert_array_equal(np.asarray(quantizer.nearest(jnp.asarray(z))), d.argmin(-1))


def test_znorm_lookup_is_the_cosine_argmax(cfg):
  q = make_quantizer(get_config("tiny"), using_znorm=True)
  rng = np.random.default_rng(6)
  z = rng.normal(0, 1, (64, 8)).astype(np.float32)
  e = np.asarray(q.embedding.embedding[...], np.float64)
  zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
  en = e / np.linalg.norm(e, axis=-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(q.nearest(jnp.asarray(z))), (zn @ en.T).argmax(-1))


def test_fhat_rebuilt_from_indices_equals_fhat_of_encoding(quantizer, encoded):
  _, indices, f_hat = encoded
  chex.assert_trees_all_close(quantizer.indices_to_fhat(indices), f_hat, atol=1e-5, rtol=1e-5)
  # flat (B, pn**2) token sequences are accepted too
  flat = [i.reshape(B, -1) for i in indices]
  chex.assert_trees_all_close(quantizer.indices_to_fhat(flat), f_hat, atol=1e-5, rtol=1e-5)


def test_residual_norm_falls_scale_by_scale(quantizer, encoded):
  f, _, _ = encoded
  fhats = nnx.jit(lambda q, f: q.encode_fhats(f))(quantizer, f)
  norms = [float(jnp.linalg.norm(f))] + [float(jnp.linalg.norm(f - fh)) for fh in fhats]
  assert all(b < a for a, b in zip(norms, norms[1:])), norms
  assert norms[-1] < 0.6 * norms[0], norms


def test_teacher_forcing_inputs_have_the_official_length(quantizer, encoded, cfg):
  _, indices, _ = encoded
  x = quantizer.teacher_forcing_inputs(indices)
  assert x.shape == (B, 679, 32) and x.dtype == jnp.float32  # L - 1 = 680 - 1 at 256 px
  assert quantizer.scale_contributions(indices).shape == (B, 679, 32)


def test_teacher_forcing_input_k_is_fhat_of_earlier_scales_resized_to_k(quantizer, encoded, cfg):
  _, indices, _ = encoded
  x = quantizer.teacher_forcing_inputs(indices)
  pns = cfg.patch_nums
  start = 0
  for k in range(1, len(pns)):
    # f_hat of scales < k: zero out the later scales' contributions by rebuilding from a prefix
    f_hat_k = 0
    for si in range(k):
      h = quantizer.embed(indices[si])
      f_hat_k = f_hat_k + quantizer.phi(si, quantizer._upsample(si, h))
    want = area_resize(f_hat_k, (pns[k], pns[k])).reshape(B, -1, 32)
    chex.assert_trees_all_close(x[:, start : start + pns[k] ** 2], want, atol=1e-5, rtol=1e-5)
    start += pns[k] ** 2


def test_incremental_update_matches_teacher_forcing_and_final_fhat(quantizer, encoded, cfg):
  _, indices, f_hat = encoded
  tf, sc = quantizer.teacher_forcing_inputs(indices), quantizer.scale_contributions(indices)
  side = cfg.patch_nums[-1]
  acc = jnp.zeros((B, side, side, 32))
  start = 0
  for si, pn in enumerate(cfg.patch_nums):
    if si > 0:
      seg = slice(start, start + pn * pn)
      before, mine = quantizer.mask_step_inputs(si, acc, indices[si])
      chex.assert_trees_all_close(before, tf[:, seg], atol=1e-5, rtol=1e-5)
      chex.assert_trees_all_close(mine, sc[:, seg], atol=1e-5, rtol=1e-5)
      start += pn * pn
    acc, nxt = quantizer.update_fhat(si, acc, indices[si])
    if si + 1 < len(cfg.patch_nums):
      npn = cfg.patch_nums[si + 1]
      chex.assert_trees_all_close(nxt, tf[:, start : start + npn**2], atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(acc, f_hat, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(nxt, f_hat.reshape(B, -1, 32), atol=1e-6)  # last scale: f_hat itself


def test_training_forward_is_straight_through_with_the_official_vq_loss(cfg):
  q = make_quantizer(get_config("tiny"))
  c = get_config("tiny")
  f = smooth_features(c)
  g = jax.random.normal(jax.random.key(0), f.shape)

  def loss(f, q):  # d/df: the straight-through path; d/dq: the codebook loss
    f_st, vq, _ = q(f)
    return jnp.sum(f_st * g) + vq - jax.lax.stop_gradient(vq), (f_st, vq)

  (_, (f_st, vq)), (df, dq) = nnx.jit(nnx.value_and_grad(loss, has_aux=True, argnums=(0, 1)))(f, q)
  commit = nnx.jit(nnx.grad(lambda f, q: q(f)[1]))(f, q)  # the commitment part only
  fhats = nnx.jit(lambda q, f: q.encode_fhats(f))(q, f)
  chex.assert_trees_all_close(f_st, fhats[-1], atol=1e-5)  # value: f_hat
  chex.assert_trees_all_close(df, g + commit, atol=1e-6)  # gradient: identity to f (+ commitment)
  want = np.mean(
    [
      c.beta * np.mean((np.asarray(fh) - np.asarray(f)) ** 2) + np.mean((np.asarray(fh) - np.asarray(f)) ** 2)
      for fh in fhats
    ]
  )
  np.testing.assert_allclose(float(vq), want, rtol=1e-5)
  assert float(jnp.abs(dq["embedding"]["embedding"][...]).max()) > 0  # f_hat carries grads to the codebook


def test_codebook_usage_ema_follows_the_official_schedule():
  c = get_config("tiny")
  q = make_quantizer(c)
  f = smooth_features(c)
  hits = [np.bincount(np.asarray(i).ravel(), minlength=c.vocab_size) for i in q.encode_indices(f)]
  hits = np.stack(hits).astype(np.float32)
  q(f, train=True)
  np.testing.assert_allclose(np.asarray(q.ema_vocab_hit[...]), hits)  # first call: copy
  q(f, train=True)
  np.testing.assert_allclose(np.asarray(q.ema_vocab_hit[...]), hits, rtol=1e-6)  # 0.9 h + 0.1 h
  assert int(q.record_hit[...]) == 2
  q(f, train=False)
  assert int(q.record_hit[...]) == 2  # eval: no update
  usage = q.codebook_usage(tokens_per_step=B * 8 * 8)
  assert usage.shape == (len(c.patch_nums),)


# ----------------------------------------------------------------------------- bad input


def test_features_of_the_wrong_size_are_rejected(quantizer):
  with pytest.raises(ValueError, match=r"\(B, 16, 16, 32\)"):
    quantizer.encode_indices(jnp.zeros((1, 13, 13, 32)))
  with pytest.raises(ValueError, match=r"\(B, 16, 16, 32\)"):
    quantizer.encode_indices(jnp.zeros((1, 16, 16, 16)))


def test_indices_outside_the_codebook_are_rejected(quantizer, encoded):
  _, indices, _ = encoded
  bad = list(indices)
  bad[3] = bad[3].at[0, 0, 0].set(4096)
  with pytest.raises(ValueError, match=r"outside the codebook \[0, 4096\)"):
    quantizer.indices_to_fhat(bad)


def test_token_maps_of_the_wrong_scale_shape_or_count_are_rejected(quantizer, encoded):
  _, indices, _ = encoded
  with pytest.raises(ValueError, match="expected 10 token maps"):
    quantizer.indices_to_fhat(indices[:-1])
  with pytest.raises(ValueError, match=r"scale 4 must be \(B, 5, 5\) or \(B, 25\)"):
    quantizer.update_fhat(4, jnp.zeros((B, 16, 16, 32)), indices[5])


@pytest.mark.parametrize("pns", [(1,), (1, 3, 2), (0, 1, 2), (1, 2, 2)])
def test_invalid_patch_nums_are_rejected(pns):
  with pytest.raises(ValueError, match="patch_nums"):
    check_patch_nums(pns)
