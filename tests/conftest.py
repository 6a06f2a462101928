"""Test-session setup: CPU JAX, quiet logs, deterministic matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402

# Tests compare against float64 references with tight tolerances: no reduced-precision matmuls.
# Also in the environment, so that subprocesses (command-line runs compared with in-process ones,
# bit for bit) compile the same programs.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", "highest")

# Many tests (and their subprocesses, which inherit the environment) compile the same tiny
# training steps: JAX's persistent compilation cache compiles each once. Its keys include the
# program, the JAX version and the flags, so a stale entry is never used.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "hmar_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)
