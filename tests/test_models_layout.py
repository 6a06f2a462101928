"""Scanned blocks and rematerialisation change how the transformer compiles, never what it computes.

A model whose blocks are one stack run by jax.lax.scan ('scan' layout) and a model with a list of
blocks hold the same numbers in two layouts (hmar_jax.models.layout converts between them); given
the same numbers they give the same logits, gradients, KV-cache steps and masked predictions,
with any remat policy. Drop path draws one key per block in both, so training steps agree too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax.models import ScaleTransformer, model_config
from hmar_jax.models import layout as layout_lib

PATCH_NUMS = (1, 2, 3)
L = 14


def config(scan, policy="none"):
  m = model_config(
    3, kind="hmar", patch_nums=PATCH_NUMS, width=64, num_heads=2, vocab_size=32, cvae=8, num_classes=10, mask_layers=2
  )
  m.attn_implementation = "xla"
  m.scan_layers = scan
  m.remat_policy = policy
  m.drop_path_rate = 0.3
  return m


def pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def models():
  lst = ScaleTransformer(config(False), rngs=nnx.Rngs(0))
  return lst, pure(lst)


def stacked_copy(params, policy="none"):
  """A scan-layout model holding `params` (list layout)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: ScaleTransformer(config(True, policy), rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, layout_lib.to_scan_layout(params)))


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  labels = jnp.asarray([1, 10], jnp.int32)
  teacher = jnp.asarray(rng.normal(size=(2, L - 1, 8)), jnp.float32)
  mask = jnp.asarray(rng.random((2, L - 1)) < 0.5)
  return labels, teacher, mask


def test_layouts_convert_both_ways_without_loss(models):
  _, params = models
  stacked = layout_lib.to_scan_layout(params)
  assert stacked["blocks"]["attn"]["qkv"].shape == (3, 64, 3, 64)
  assert stacked["mask_blocks"]["ffn"]["fc1"]["kernel"].shape == (2, 64, 256)
  back = layout_lib.to_list_layout(stacked)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("scan", [True, False])
def test_the_shapes_of_a_layout_are_those_of_the_converted_arrays(models, scan):
  _, params = models
  source = params if scan else layout_lib.to_scan_layout(params)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), source)
  want = jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), layout_lib.to_layout(source, scan))
  got = jax.tree.map(lambda a: (a.shape, a.dtype), layout_lib.to_layout_shapes(shapes, scan))
  assert jax.tree.structure(got, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(
    want, is_leaf=lambda x: isinstance(x, tuple)
  )
  assert got == want


@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_and_inputs"])
def test_scanned_blocks_give_the_list_model_loss_and_gradients(models, inputs, policy):
  lst, params = models
  scanned = stacked_copy(params, policy)
  labels, teacher, _ = inputs
  key = jax.random.key(5)

  def loss_and_grads(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
      def loss(s):
        logits = nnx.merge(graphdef, s).nsp_logits(labels, teacher, train=True, key=key)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

      return jax.value_and_grad(loss)(state)

    value, grads = run(state)
    return float(value), layout_lib.to_list_layout(nnx.to_pure_dict(grads))

  want, g_want = loss_and_grads(lst)
  got, g_got = loss_and_grads(scanned)
  assert got == pytest.approx(want, rel=1e-6)
  for a, b in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_scanned_blocks_give_the_same_cached_and_masked_steps(models, inputs):
  lst, params = models
  scanned = stacked_copy(params)
  labels, teacher, mask = inputs
  ca, cb = lst.init_cache(2), scanned.init_cache(2)
  assert cb["k"].shape == (2, 3, 2, L, 32)
  for si, x in ((0, None), (1, teacher[:, :4]), (2, teacher[:, 4:])):
    a, ca = lst.nsp_scale_logits_cached(si, labels, x, ca)
    b, cb = scanned.nsp_scale_logits_cached(si, labels, x, cb)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(scanned.mp_logits(labels, teacher, teacher, mask)),
    np.asarray(lst.mp_logits(labels, teacher, teacher, mask)),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(scanned.nsp_scale_logits(2, labels, teacher[:, 4:])),
    np.asarray(lst.nsp_scale_logits(2, labels, teacher[:, 4:])),
    rtol=1e-5,
    atol=1e-6,
  )


def cached_step_memory(model, si: int, batch: int = 64):
  """memory_analysis() of the compiled KV-cache step of scale `si`, the cache donated, and the
  cache's bytes."""
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch)
  n = model.patch_nums[si] ** 2

  def step(state, labels, x, cache):
    return nnx.merge(graphdef, state).nsp_scale_logits_cached(si, labels, x, cache)

  args = (state, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, n, model.cvae)), cache)
  memory = jax.jit(step, donate_argnames="cache").lower(*args).compile().memory_analysis()
  return memory, sum(a.nbytes for a in jax.tree.leaves(cache))


@pytest.mark.parametrize("scan", [False, True])
def test_a_cache_step_updates_its_donated_cache_without_a_second_one(scan):
  """The output cache is the input's buffer, and the step's scratch stays below one cache (a stack
  scanned as the loop's xs came back as a freshly stacked copy). Five scales, so that the cache
  outweighs one scale's activations."""
  m = config(scan)
  m.patch_nums = (1, 2, 3, 4, 5)
  memory, cache_bytes = cached_step_memory(ScaleTransformer(m, rngs=nnx.Rngs(0)), si=2)
  assert memory.alias_size_in_bytes == cache_bytes
  assert memory.temp_size_in_bytes < 0.75 * cache_bytes


def test_a_cache_of_the_other_layout_is_refused(models):
  lst, params = models
  with pytest.raises(ValueError, match="use model.init_cache"):
    lst.nsp_scale_logits_cached(0, jnp.asarray([1]), None, stacked_copy(params).init_cache(1))


def test_the_masked_branch_copies_the_last_blocks_in_both_layouts(models):
  lst, params = models
  scanned = stacked_copy(params)
  lst2 = ScaleTransformer(config(False), rngs=nnx.Rngs(0))
  lst2.init_mask_branch_from_next_scale()
  scanned.init_mask_branch_from_next_scale()
  got = layout_lib.to_list_layout(pure(scanned))["mask_blocks"]
  want = pure(lst2)["mask_blocks"]
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
