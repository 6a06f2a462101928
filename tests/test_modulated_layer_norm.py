"""adaLN's modulated LayerNorm: the plain formula's values, and its hand-written gradient equal to
the float64 derivative of LayerNorm(x) * (1 + scale) + shift (PyTorch's autograd as the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hmar_jax.models.blocks import layer_norm, modulated_layer_norm

EPS = 1e-6


def _inputs(seed, shape=(3, 7, 32), cond_shape=(3, 1, 32)):
  r = np.random.default_rng(seed)
  x = r.normal(size=shape) * 2.0 + 0.5
  scale = r.normal(size=cond_shape) * 0.3
  shift = r.normal(size=cond_shape)
  weight = r.normal(size=shape)  # the loss: sum(out * weight)
  return x, scale, shift, weight


def _torch_grads(x, scale, shift, weight):
  t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, shift)]
  out = torch.nn.functional.layer_norm(t[0], t[0].shape[-1:], eps=EPS) * (1 + t[1]) + t[2]
  (out * torch.tensor(weight, dtype=torch.float64)).sum().backward()
  return [a.grad.numpy() for a in t]


def test_values_are_the_plain_formulas_bit_for_bit():
  x, scale, shift, _ = (jnp.asarray(a, jnp.float32) for a in _inputs(0))
  got = modulated_layer_norm(x, scale, shift, EPS, jnp.bfloat16)
  want = (layer_norm(x, EPS) * (1 + scale) + shift).astype(jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("cond_shape", [(3, 1, 32), (1, 1, 32), (32,)])
def test_gradient_matches_float64_autograd(cond_shape):
  x, scale, shift, weight = _inputs(1, cond_shape=cond_shape)

  def loss(x, scale, shift):
    return jnp.sum(modulated_layer_norm(x, scale, shift, EPS, jnp.float32) * jnp.asarray(weight, jnp.float32))

  got = jax.grad(loss, (0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in (x, scale, shift)))
  want = _torch_grads(x, scale, shift, weight)
  for name, g, w in zip(("x", "scale", "shift"), got, want, strict=True):
    assert g.shape == w.shape, name
    # float32 against float64: relative to the largest entry.
    np.testing.assert_allclose(np.asarray(g), w, atol=2e-6 * np.abs(w).max(), err_msg=name)


def test_gradient_of_a_bfloat16_input_comes_back_in_bfloat16():
  x, scale, shift, weight = _inputs(2)
  xb = jnp.asarray(x, jnp.bfloat16)

  def loss(x):
    out = modulated_layer_norm(x, jnp.asarray(scale, jnp.float32), jnp.asarray(shift, jnp.float32), EPS, jnp.float32)
    return jnp.sum(out * jnp.asarray(weight, jnp.float32))

  g = jax.grad(loss)(xb)
  assert g.dtype == jnp.bfloat16
  want = _torch_grads(np.asarray(xb.astype(jnp.float32), np.float64), scale, shift, weight)[0]
  np.testing.assert_allclose(np.asarray(g, np.float32), want, atol=1e-2 * np.abs(want).max())
