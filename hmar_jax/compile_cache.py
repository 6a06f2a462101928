"""JAX's persistent compilation cache, on by default for the command-line entry points.

A first run compiles every program (on a GPU most of that is XLA's kernel autotuning: an HMAR d16
sampler's first images come a minute after start, its rerun from the cache in 12-17 s; a d24 train
step compiles for about 45 s). JAX reuses compiled programs across processes only when
`jax_compilation_cache_dir` is set, which it is not by default; the entry points set it to a folder
under the user's cache directory unless the environment already says otherwise:

  JAX_COMPILATION_CACHE_DIR=/path     that folder (JAX reads the variable itself)
  JAX_COMPILATION_CACHE_DIR=          no persistent cache
"""

from __future__ import annotations

import os

import jax

ENV = "JAX_COMPILATION_CACHE_DIR"


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/hmar_jax/jax_compilation_cache (XDG_CACHE_HOME defaults to ~/.cache)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hmar_jax", "jax_compilation_cache")


def enable_compilation_cache() -> str | None:
  """Points JAX's persistent compilation cache at default_cache_dir() unless JAX_COMPILATION_CACHE_DIR
  is set (to a folder, which JAX uses, or empty, for none). Returns the folder in use, or None."""
  if ENV in os.environ:
    return os.environ[ENV] or None
  directory = default_cache_dir()
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:  # a read-only home: run without the cache rather than fail
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory
