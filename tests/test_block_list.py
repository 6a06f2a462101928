"""Lists of identical blocks drawn together: the list layout, with one block's initialisers traced."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxpr_helpers import count_equations

from hmar_jax.models import mar
from hmar_jax.models.blocks import block_list

WIDTH, HEADS = 32, 4
DRAWS = ("random_bits", "threefry2x32")  # the primitives that draw random bits


def make(rngs: nnx.Rngs) -> mar.Block:
  return mar.Block(WIDTH, HEADS, 4.0, dtype=jnp.float32, rngs=rngs)


def _leaves_with_paths(module):
  return jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]


def test_the_list_has_the_variables_shapes_and_sharding_names_of_blocks_built_one_by_one():
  rngs = nnx.Rngs(0)
  ours = block_list(make, 3, nnx.Rngs(0))
  theirs = nnx.List([make(rngs) for _ in range(3)])
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
  for (path, a), (_, b) in zip(_leaves_with_paths(ours), _leaves_with_paths(theirs), strict=True):
    assert (a.shape, a.dtype) == (b.shape, b.dtype), path
  names = lambda m: [getattr(v, "out_sharding", None) for _, v in nnx.iter_graph(m) if isinstance(v, nnx.Param)]
  assert names(ours) == names(theirs) and any(names(ours))


def test_each_block_holds_its_own_draw_and_the_same_seed_gives_the_same_blocks():
  blocks = block_list(make, 3, nnx.Rngs(0))
  kernels = [np.asarray(b.attn.qkv.kernel[...]) for b in blocks]
  assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])
  again = block_list(make, 3, nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(blocks)), jax.tree.leaves(nnx.state(again)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_draws_follow_the_blocks_initialisers():
  blocks = block_list(make, 4, nnx.Rngs(1))
  one = make(nnx.Rngs(1))
  for b in blocks:  # zero-initialised biases and unit LayerNorm scales stay exactly so
    np.testing.assert_array_equal(b.attn.qkv.bias[...], one.attn.qkv.bias[...])
    np.testing.assert_array_equal(b.norm1.scale[...], one.norm1.scale[...])
  stds = [float(np.std(np.asarray(b.mlp.fc1.kernel[...]))) for b in blocks]
  np.testing.assert_allclose(stds, float(np.std(np.asarray(one.mlp.fc1.kernel[...]))), rtol=0.1)


def test_a_longer_list_traces_no_more_random_draws():
  def draws(n):
    build = lambda key: nnx.to_pure_dict(nnx.state(block_list(make, n, nnx.Rngs(params=key))))  # noqa: E731
    return count_equations(jax.make_jaxpr(build)(jax.random.key(0)).jaxpr, DRAWS)

  def draws_one_by_one(n):
    build = lambda key: nnx.to_pure_dict(nnx.state(nnx.List([make(r) for r in [nnx.Rngs(params=key)] * n])))  # noqa: E731
    return count_equations(jax.make_jaxpr(build)(jax.random.key(0)).jaxpr, DRAWS)

  assert draws(2) == draws(6) > 0
  assert draws_one_by_one(6) > draws_one_by_one(2)  # what the test tells apart
