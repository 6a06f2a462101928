"""NNX modules built as shapes only (for restoring into, converting and compiling), quickly.

nnx.eval_shape traces a module's constructor. Each `rngs.params()` call in it adds one to the
stream's counter, and Flax's update of a traced counter asks the new value for its `.sharding`; on
a tracer JAX answers with an AttributeError whose message it builds by walking the whole trace so
far, so the trace grows with the square of the initialiser count: about 1.2 s of the 1.5 s that
nnx.eval_shape takes for the VQVAE on one CPU core. Here the counters are host numbers, never
traced. Only for shapes: JAX keeps a numpy constant of a trace by reference and the counter is
incremented in place, so keys drawn under jit from such a stream would all see its last count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
from flax import nnx

M = TypeVar("M")


def _host_counted_rngs(seed: int) -> nnx.Rngs:
  rngs = nnx.Rngs(seed)
  for _, node in nnx.iter_graph(rngs):
    if isinstance(node, nnx.RngCount):
      node.set_value(np.zeros(node.shape, np.uint32))
  return rngs


def abstract_module(make: Callable[[nnx.Rngs], M], seed: int = 0) -> M:
  """The module `make(rngs)` builds, as ShapeDtypeStructs (the shapes and dtypes of nnx.eval_shape)."""
  return nnx.eval_shape(lambda: make(_host_counted_rngs(seed)))
