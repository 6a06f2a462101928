"""Per-program XLA options: the GEMM / convolution autotuning level on CUDA GPUs.

While compiling for a CUDA GPU, XLA times candidate kernels (cuBLAS, cuDNN, Triton tilings) for each
matmul and convolution fusion it has not seen in this process: most of a first compile's time on a
GPU. The `xla_gpu_autotune_level` option sets how: 0 off (a heuristic picks each kernel), 1 on,
2-4 also initialise / re-initialise the buffers and check each candidate's result against a
reference (XLA's default: 4). Given per `jax.jit`, it applies to that program only, whatever
XLA_FLAGS holds for the rest of the process.
"""

from __future__ import annotations

import jax

AUTOTUNE_LEVELS = (0, 1, 2, 3, 4)


def check_autotune_level(name: str, level: int | None) -> None:
  """Raises ValueError naming `name` unless `level` is None or one of AUTOTUNE_LEVELS."""
  if level is not None and (isinstance(level, bool) or level not in AUTOTUNE_LEVELS):
    raise ValueError(f"{name} must be one of {AUTOTUNE_LEVELS} or None (XLA's default), got {level!r}")


def gpu_compiler_options(autotune_level: int | None) -> dict[str, int] | None:
  """`jax.jit(..., compiler_options=...)` setting XLA's autotuning level when the default backend is a
  CUDA GPU; None elsewhere (the CPU and TPU compilers have no such pass) or when the level is None."""
  check_autotune_level("autotune_level", autotune_level)
  if autotune_level is None or jax.default_backend() != "gpu":
    return None
  return {"xla_gpu_autotune_level": int(autotune_level)}
