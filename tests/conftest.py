"""Test-session setup: CPU JAX, quiet logs, deterministic matmuls."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402

# Tests compare against float64 references with tight tolerances: no reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
