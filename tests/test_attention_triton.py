"""CUDA path of scale attention, as far as a CPU machine can check it.

The kernels themselves are checked on a GPU by bench/gpu_check_attention.py (output committed
under bench/results/); here: lazy imports, config choice, and a clear error without jax-triton.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_oracle import attention_f64

from pallas_kernels import api, triton_gpu


def test_importing_the_package_loads_neither_triton_nor_jax_triton():
  code = (
    "import sys, pallas_kernels, pallas_kernels.triton_gpu; "
    "print(int('triton' in sys.modules), int('jax_triton' in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.stdout.split() == ["0", "0"]


@pytest.mark.skipif(
  importlib.util.find_spec("jax_triton") is not None,
  reason="jax_triton installed: the missing-package error cannot be provoked",
)
def test_triton_without_jax_triton_raises_a_clear_error():
  q = jnp.zeros((1, 14, 1, 64), jnp.bfloat16)
  with pytest.raises(ImportError, match="needs the jax-triton package"):
    api.scale_attention(q, q, q, (1, 2, 3), "block_causal", implementation="triton")
  assert not triton_gpu.available()


def test_bad_shapes_are_rejected_before_any_kernel():
  q = jnp.zeros((1, 14, 1, 96), jnp.bfloat16)
  with pytest.raises(ValueError, match="head dim"):
    api.scale_attention(q, q, q, (1, 2, 3), "block_causal", implementation="triton")


@pytest.mark.parametrize(
  "patch_nums,forward_query_rows",
  [
    ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 64),  # 256 px, 680 tokens
    ((1, 2, 3, 4, 6, 9, 13, 18, 24, 32), 64),  # 512 px, 2240 tokens
    ((1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), 128),  # 1024 px, 9451 tokens
  ],
)
def test_only_the_1024px_layout_gets_128_row_forward_tiles(patch_nums, forward_query_rows):
  # The H100 timings (bench/NOTES_attention.md): 128-query forward tiles win at 9451 tokens only;
  # the backward keeps 64 x 64 tiles at every length; shipped configs never poison their outputs.
  cfg = triton_gpu.config_for_length(sum(p * p for p in patch_nums))
  assert (cfg.fwd_block_m, cfg.fwd_block_n) == (forward_query_rows, 64)
  assert (cfg.dkv_block_m, cfg.dkv_block_n, cfg.dq_block_m, cfg.dq_block_n) == (64, 64, 64, 64)
  assert not cfg.poison_outputs


def test_auto_on_gpu_backend_falls_back_to_xla_without_jax_triton():
  expected = "triton" if triton_gpu.available() else "xla"
  assert api.resolve_implementation("auto", backend="gpu") == expected


@pytest.mark.skipif(
  jax.default_backend() != "gpu" or not triton_gpu.available(), reason="needs a CUDA GPU and jax_triton"
)
def test_triton_matches_reference_on_gpu():
  pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 680, 2, 64)), jnp.float32) for _ in range(3))
  out = api.scale_attention(q, k, v, pn, "block_diagonal", implementation="triton")
  ref = attention_f64(q, k, v, pn, "block_diagonal")
  assert float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()) < 1e-4
