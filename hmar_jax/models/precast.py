"""Linear weights stored in their compute dtype, for inference loops.

An `nnx.Linear(dtype=bfloat16, param_dtype=float32)` casts its float32 kernel and bias to bfloat16
at every call. Inside a sampling loop (a diffusion head's 100 or 250 steps, a backbone called once
per mask step) XLA repeats those casts each iteration: on an H200 the MAR head's twelve 1024 x 1024
kernel casts were 12 of its ~75 kernels per diffusion step. `precast_linears` makes a copy of a
module whose Linear kernels and biases already hold the cast values, so the casts run once.

The result is bit-identical: each Linear casts its inputs, kernel and bias to its `dtype` before the
matmul (flax's promote_dtype), and a value cast twice to the same dtype equals the value cast once.
Only Linears are touched: a LayerNorm multiplies by its float32 scale in float32 before casting its
output, so rounding its parameters first would change the result.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def precast_linears(module: nnx.Module) -> nnx.Module:
  """A copy of `module` (sharing every array it does not recast) whose nnx.Linear kernels and
  biases are stored in that Linear's compute dtype; the original is left as it was. Works on
  concrete and on traced (inside jit) parameters."""
  copy = nnx.clone(module)  # new Variables around the same arrays: setting one leaves `module` as it was
  for _, sub in nnx.iter_graph(copy):
    if not isinstance(sub, nnx.Linear) or sub.dtype is None:
      continue
    dtype = jnp.dtype(sub.dtype)
    for name in ("kernel", "bias"):
      variable = getattr(sub, name, None)
      if variable is not None and variable[...].dtype != dtype:
        variable.set_value(variable[...].astype(dtype))
  return copy
