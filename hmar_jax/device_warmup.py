"""Device start-up work done in a background thread while a program builds and traces its models.

Two one-time costs fall on whatever first uses a CUDA GPU in a process, measured on one H200 with
JAX's defaults:
  * the allocator reserving its pool (75% of the GPU's memory) at the first transfer: 1.8 s;
  * the first run of a process's programs. A sampler rerun from the persistent compilation cache
    (nothing compiled, so nothing autotuned) took 1.1 s from its weights arriving to its first
    images, against 0.35 s in a process that had compiled (and autotuned) the same programs; the
    math libraries' set-up at a first matmul and convolution is the likely difference.
Both are paid in C++ outside Python's lock, so a thread can pay them while the main thread builds
abstract models and traces. With this warm-up the rerun's gap before tracing fell from 1.4 s to 0.3 s
and its last step from 1.1 s to 0.7 s (one call each). Elsewhere (CPU, TPU) the work is cheap.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hmar_jax.compile_options import gpu_compiler_options

# Big enough that XLA keeps the matmul a library call (cuBLAS) rather than an elementwise fusion.
WARMUP_SIDE = 64


def start_device_warmup(devices=None, *, triton_gemm: bool | None = False) -> concurrent.futures.Future:
  """Starts `warm_up(devices)` in a thread and returns its future (its result: the devices warmed
  up). Nothing waits for it: a device that fails here fails again, with its own error, when used.

  triton_gemm: as the programs to come compile their matmuls (`Sampler.gpu_triton_gemm`): off, the
  warm-up's matmul goes to cuBLAS as theirs do."""
  devices = list(jax.local_devices() if devices is None else devices)
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device-warmup")
  future = pool.submit(warm_up, devices, triton_gemm=triton_gemm)
  pool.shutdown(wait=False)
  return future


def warm_up(devices, *, triton_gemm: bool | None = False) -> list:
  """On each device: a first transfer (the allocator's reservation) and one small program with a
  matmul and a convolution in float32 and bfloat16 (the math libraries' set-up). Returns the
  devices, in order."""
  program = _matmul_and_conv(triton_gemm)
  for device in devices:
    x = jax.device_put(np.ones((1, WARMUP_SIDE, WARMUP_SIDE, 4), np.float32), device)
    jax.block_until_ready(program(x))
  return list(devices)


@functools.cache
def _matmul_and_conv(triton_gemm: bool | None):
  def run(x):
    """x (1, S, S, 4) -> a scalar from an (S, S) @ (S, S) matmul and a 3x3 convolution, each in
    float32 and bfloat16."""
    total = jnp.zeros((), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
      y = x.astype(dtype)
      square = y[0, :, :, 0]
      kernel = jnp.ones((3, 3, 4, 4), dtype)
      conv = jax.lax.conv_general_dilated(y, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      total += (square @ square).astype(jnp.float32).sum() + conv.astype(jnp.float32).sum()
    return total

  return jax.jit(run, compiler_options=gpu_compiler_options(None, triton_gemm))
