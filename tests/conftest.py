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


# The longest test files (CPU seconds on the 2-core CI machine, cold compilation cache), longest
# first. Two workers take whole files in collection order (--dist loadfile), so starting these
# first lets the short files fill in at the end instead of one worker finishing a long file alone.
LONGEST_FILES_FIRST = (
  "test_tpu_compile.py",
  "test_training_sharded.py",
  "test_mar_task.py",
  "test_main_job.py",
  "test_kl_tokenizer_task.py",
  "test_main_job_mar.py",
  "test_training_multiprocess_tensor.py",
  "test_tokenizer_training.py",
  "test_sampling_sampler.py",
  "test_sampling_program_cache.py",
  "test_training_multiprocess.py",
  "test_himar_task.py",
  "test_sampling_at_scale.py",
  "test_training_resume.py",
  "test_himar_model.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
