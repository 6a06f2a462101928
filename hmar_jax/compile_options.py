"""Per-program XLA options on CUDA GPUs: the GEMM / convolution autotuning level, Triton GEMMs.

While compiling for a CUDA GPU, XLA times candidate kernels (cuBLAS, cuDNN, Triton tilings) for each
matmul and convolution fusion it has not seen in this process: most of a first compile's time on a
GPU. The `xla_gpu_autotune_level` option sets how: 0 off (a heuristic picks each kernel), 1 on,
2-4 also initialise / re-initialise the buffers and check each candidate's result against a
reference (XLA's default: 4). Given per `jax.jit`, it applies to that program only, whatever
XLA_FLAGS holds for the rest of the process.

`xla_gpu_enable_triton_gemm` lets XLA emit matmul fusions as Triton kernels; each such fusion is
autotuned by compiling and timing dozens of Triton tilings (most of the PTX compiled for a program).
Off, matmuls go to cuBLAS, whose autotuning runs candidates without compiling any.
"""

from __future__ import annotations

import jax

AUTOTUNE_LEVELS = (0, 1, 2, 3, 4)


def check_autotune_level(name: str, level: int | None) -> None:
  """Raises ValueError naming `name` unless `level` is None or one of AUTOTUNE_LEVELS."""
  if level is not None and (isinstance(level, bool) or level not in AUTOTUNE_LEVELS):
    raise ValueError(f"{name} must be one of {AUTOTUNE_LEVELS} or None (XLA's default), got {level!r}")


def gpu_compiler_options(autotune_level: int | None, triton_gemm: bool | None = None) -> dict[str, int | bool] | None:
  """`jax.jit(..., compiler_options=...)` setting XLA's autotuning level and whether matmuls may become
  Triton GEMM fusions, when the default backend is a CUDA GPU; None elsewhere (the CPU and TPU
  compilers have neither) or when both are None (XLA's defaults, or XLA_FLAGS')."""
  check_autotune_level("autotune_level", autotune_level)
  if triton_gemm is not None and not isinstance(triton_gemm, bool):
    raise ValueError(f"triton_gemm must be True, False or None (XLA's default), got {triton_gemm!r}")
  if jax.default_backend() != "gpu":
    return None
  options: dict[str, int | bool] = {}
  if autotune_level is not None:
    options["xla_gpu_autotune_level"] = int(autotune_level)
  if triton_gemm is not None:
    options["xla_gpu_enable_triton_gemm"] = triton_gemm
  return options or None
