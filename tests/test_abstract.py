"""Modules built as shapes only: what nnx.eval_shape gives, without tracing the random counters."""

import os

import jax
import numpy as np
from flax import nnx

from hmar_jax import config_utils
from hmar_jax.abstract import abstract_module
from hmar_jax.tokenizer.vqvae import VQVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Stack(nnx.Module):
  """Nine draws from one stream: a kernel and a bias each for a conv and three linears, and an embedding."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])
    self.embed = nnx.Embed(10, 8, rngs=rngs)


def test_an_abstract_module_has_the_structure_shapes_and_dtypes_of_nnx_eval_shape():
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "hmar.py:tiny")).tokenizer.config
  ours = nnx.state(abstract_module(lambda rngs: VQVAE(config, rngs=rngs)))
  theirs = nnx.state(nnx.eval_shape(lambda: VQVAE(config, rngs=nnx.Rngs(0))))
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(ours)] == [(x.shape, x.dtype) for x in jax.tree.leaves(theirs)]
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ours))


def test_the_random_counters_stay_host_numbers_while_the_constructor_is_traced():
  counts = []

  def make(rngs):
    module = Stack(rngs)
    counts.append(rngs.params.count.get_value())
    return module

  abstract_module(make)
  assert isinstance(counts[0], np.ndarray) and int(counts[0]) == 9
