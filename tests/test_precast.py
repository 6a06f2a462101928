"""Linear weights cast to their compute dtype once, for sampling loops (hmar_jax/models/precast.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.models import mar
from hmar_jax.models.diffloss import DiffLoss
from hmar_jax.models.precast import precast_linears
from tests.jaxpr_helpers import count_equations


def tiny_backbone(dtype="bfloat16"):
  c = mar.mar_config("tiny")
  c.dtype = dtype
  return mar.MARBackbone(c, rngs=nnx.Rngs(0))


def test_every_linear_of_the_copy_holds_its_compute_dtype():
  copy = precast_linears(tiny_backbone())
  linears = [m for _, m in nnx.iter_graph(copy) if isinstance(m, nnx.Linear)]
  assert linears
  for lin in linears:
    assert lin.kernel[...].dtype == jnp.bfloat16
    assert lin.bias[...].dtype == jnp.bfloat16


def test_layer_norms_and_embeddings_keep_float32():
  copy = precast_linears(tiny_backbone())
  norms = [m for _, m in nnx.iter_graph(copy) if isinstance(m, nnx.LayerNorm)]
  assert norms and all(n.scale[...].dtype == jnp.float32 for n in norms)
  assert copy.encoder_pos_embed_learned[...].dtype == jnp.float32


def test_the_original_module_is_left_as_it_was():
  model = tiny_backbone()
  precast_linears(model)
  assert all(m.kernel[...].dtype == jnp.float32 for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear))


def test_the_copy_computes_bit_identical_outputs():
  model = tiny_backbone()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.standard_normal((3, model.seq_len, model.token_embed_dim)), jnp.float32)
  mask = jnp.asarray(rng.random((3, model.seq_len)) < 0.5)
  labels = jnp.array([0, 3, 9], jnp.int32)
  cap = model.buffer_size + model.seq_len
  want = model(tokens, mask, labels, capacity=cap)
  got = precast_linears(model)(tokens, mask, labels, capacity=cap)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_float32_module_is_unchanged():
  copy = precast_linears(tiny_backbone("float32"))
  assert all(m.kernel[...].dtype == jnp.float32 for _, m in nnx.iter_graph(copy) if isinstance(m, nnx.Linear))


def _head_sample_jaxpr():
  head = DiffLoss(16, 64, 2, 64, "10", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  z = jnp.zeros((8, 64), jnp.float32)
  return jax.make_jaxpr(lambda z, k: head.sample(z, k, 1.0, 2.0))(z, jax.random.key(0)).jaxpr


LOOPS = ("while", "scan")  # a fori_loop of static length is a scan


def _outer_loops(jaxpr):
  """The loop equations of `jaxpr` that are inside no other loop (looking through pjit etc.)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in LOOPS:
      found.append(eqn)
      continue
    for param in eqn.params.values():
      for inner in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          found += _outer_loops(inner)
  return found


def _loop_body(jaxpr):
  """The diffusion loop's body (the only outermost loop)."""
  (loop,) = _outer_loops(jaxpr)
  body = loop.params["jaxpr"] if loop.primitive.name == "scan" else loop.params["body_jaxpr"]
  return body.jaxpr


def test_the_mlp_heads_diffusion_loop_casts_no_weights():
  body = _loop_body(_head_sample_jaxpr())
  casts = [
    e
    for e in body.eqns
    if e.primitive.name == "convert_element_type"
    and e.invars[0].aval.dtype == jnp.float32
    and e.params["new_dtype"] == jnp.bfloat16
    and e.invars[0].aval.ndim == 2
    and e.invars[0].aval.shape[0] == 64  # a (64, 64) kernel, not the (8, .) activations
  ]
  assert casts == []


def test_the_mlp_heads_diffusion_loop_finds_its_time_row_without_a_loop():
  assert count_equations(_loop_body(_head_sample_jaxpr()), LOOPS) == 0
