"""Per-program XLA options: the GPU autotuning level reaches XLA only on a CUDA GPU, and a level XLA
does not have is refused by name before anything compiles."""

import jax
import jax.numpy as jnp
import pytest

from hmar_jax.compile_options import check_autotune_level, gpu_compiler_options


@pytest.mark.parametrize("level", [None, 0, 4])
def test_no_options_off_a_gpu(level):
  assert jax.default_backend() != "gpu"
  assert gpu_compiler_options(level) is None


def test_a_gpu_gets_the_level_as_an_xla_option(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert gpu_compiler_options(0) == {"xla_gpu_autotune_level": 0}
  assert gpu_compiler_options(None) is None


def test_a_gpu_gets_triton_gemm_as_an_xla_option(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert gpu_compiler_options(None, triton_gemm=False) == {"xla_gpu_enable_triton_gemm": False}
  assert gpu_compiler_options(1, triton_gemm=True) == {"xla_gpu_autotune_level": 1, "xla_gpu_enable_triton_gemm": True}


@pytest.mark.parametrize("value", [0, "off", 1.0])
def test_triton_gemm_takes_a_bool_or_none(value):
  with pytest.raises(ValueError, match="triton_gemm must be True, False or None"):
    gpu_compiler_options(None, triton_gemm=value)


@pytest.mark.parametrize("level", [-1, 5, 1.5, True, "2"])
def test_a_level_xla_does_not_have_is_named(level):
  with pytest.raises(ValueError, match=r"sampler\.level must be one of \(0, 1, 2, 3, 4\) or None"):
    check_autotune_level("sampler.level", level)


def test_xla_accepts_the_option_name_on_this_backend():
  # The name is a real XLA debug option: an unknown one fails the compile (checked on the CPU here).
  f = jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False})
  assert int(f(jnp.int32(1))) == 2
  with pytest.raises(Exception, match="xla_gpu_autotune_levl"):
    jax.jit(lambda x: x + 2, compiler_options={"xla_gpu_autotune_levl": 0})(jnp.int32(1))
