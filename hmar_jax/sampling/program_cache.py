"""The sampler's compiled programs, kept on disk so that a rerun neither traces nor compiles them.

JAX's persistent compilation cache saves a rerun the compiling, not the tracing: every program is
still traced and lowered to find its cache key, and for HMAR d16's 16 sampling programs that took
3.3-5.5 s of Python on H200 hosts, a third of a rerun's start. This cache stores the compiled
executables themselves (`jax.experimental.serialize_executable`), under a key made before anything
is traced: whatever decides the programs' code and shapes (the package's source, the library
versions, the devices, the models' structure and weight shapes and placements, the sampler's
settings, the batch and the options of `Sampler.sample` that are not traced values). A rerun with
the same key reads them back (HMAR d16's 16 on an H200 in 1.5 s); any difference is a miss, which traces and
compiles as usual and writes a new entry.

It lives beside JAX's persistent cache (`default_program_cache_dir`), so JAX_COMPILATION_CACHE_DIR
turns both on or off; by default only on GPUs (DEFAULT_PLATFORMS says why). Like JAX's cache, it loads executables it wrote itself: point it only at a
folder you own. One file per key, written atomically; an unreadable or stale file is ignored with a
warning (and the programs are traced again), never fatal.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import io
import json
import logging
import os
import pickle
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable

import jax
import numpy as np

FORMAT = 1
SUBDIR = "hmar_jax_programs"
# Packages whose code ends up in the programs, besides jax and jaxlib.
_VERSIONED = ("jax", "jaxlib", "flax", "jax-triton", "triton", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu")
# JAX settings that change what a traced function lowers to.
_LOWERING_FLAGS = (
  "jax_enable_x64",
  "jax_default_matmul_precision",
  "jax_default_prng_impl",
  "jax_threefry_partitionable",
  "jax_numpy_dtype_promotion",
  "jax_use_shardy_partitioner",
)
_SOURCE_PACKAGES = ("hmar_jax", "pallas_kernels")


# Platforms on which saved programs were seen to load back and give the same images, also when JAX's
# persistent cache had supplied them (an H200: bench/results/raw/sample/). On these the cache is on
# by default (`default_program_cache_dir`). Not on the CPU, where XLA's client serialises some
# executables incompletely: one that JAX's cache supplied fails when run after a round trip
# ("Function ... not found"), and one compiled after other programs ran may not serialise at all
# ("`LessThan` is not serializable"). Not on TPUs either, where it has not been checked.
DEFAULT_PLATFORMS = ("gpu",)
# Platforms where an executable that JAX's cache supplied may be saved again (elsewhere only
# programs compiled afresh are, which an explicitly given cache on the CPU relies on).
RESERIALIZABLE_PLATFORMS = ("gpu",)
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_compiling = threading.local()  # per compiling thread: whether JAX's persistent cache answered
_listening = threading.Lock()
_listener_registered = False


def _note_cache_hit(event: str, **kwargs) -> None:
  if event == _CACHE_HIT_EVENT:
    _compiling.cache_hit = True


def compile_noting_cache_reads(lowered) -> tuple[object, bool]:
  """(lowered.compile(), whether JAX's persistent cache supplied the executable). JAX announces a
  cache hit as an event in the compiling thread, so each thread notes its own."""
  global _listener_registered
  with _listening:
    if not _listener_registered:  # one listener for the process: JAX's listeners cannot be removed
      jax.monitoring.register_event_listener(_note_cache_hit)
      _listener_registered = True
  _compiling.cache_hit = False
  compiled = lowered.compile()
  return compiled, _compiling.cache_hit


def platform() -> str:
  """The platform of this process's devices ('gpu', 'tpu', 'cpu')."""
  return jax.local_devices()[0].platform


def default_program_cache_dir() -> str | None:
  """A folder inside JAX's persistent compilation cache; None when that cache is off or the
  platform is not one of DEFAULT_PLATFORMS."""
  base = jax.config.jax_compilation_cache_dir
  return os.path.join(base, SUBDIR) if base and platform() in DEFAULT_PLATFORMS else None


@functools.cache
def source_fingerprint() -> str:
  """sha256 of every Python file of the packages whose functions the sampler traces."""
  digest = hashlib.sha256()
  for package in _SOURCE_PACKAGES:
    root = os.path.dirname(importlib.import_module(package).__file__)
    for folder, dirs, files in os.walk(root):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for name in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
          digest.update(f.read() + b"\0")
  return digest.hexdigest()


def _versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      out[name] = importlib.metadata.version(name)
  return out


def environment() -> dict:
  """What the programs depend on outside the sampler: code, versions, devices, flags."""
  devices = jax.local_devices()
  backend = devices[0].client
  return {
    "format": FORMAT,
    "source": source_fingerprint(),
    "versions": _versions(),
    "platform": [backend.platform, backend.platform_version],
    "devices": [[d.id, d.device_kind] for d in devices],
    "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")},
    "flags": {k: str(getattr(jax.config, k, None)) for k in _LOWERING_FLAGS},
  }


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def structure_text(obj) -> str:
  """repr of `obj` without memory addresses (a function's repr names it `at 0x...`)."""
  return _ADDRESS.sub("", repr(obj))


def sharding_text(sharding) -> str | None:
  """The sharding's kind, layout and devices in order (a NamedSharding's repr omits the devices)."""
  if sharding is None:
    return None
  mesh = getattr(sharding, "mesh", None)
  ids = np.asarray(mesh.device_ids).tolist() if mesh is not None else sorted(d.id for d in sharding.device_set)
  return f"{sharding!r} on {ids}"


def spec_text(x) -> list:
  """[[shape, dtype, sharding]] of every leaf of `x` (arrays, or shapes as jax.ShapeDtypeStruct)."""
  return [
    [list(np.shape(a)), str(getattr(a, "dtype", np.asarray(a).dtype)), sharding_text(getattr(a, "sharding", None))]
    for a in jax.tree.leaves(x)
  ]


def key_of(parts: dict) -> str:
  """The cache key: sha256 of `parts` and `environment()` as JSON."""
  text = json.dumps({"environment": environment(), **parts}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _devices_of(compiled) -> list[int]:
  # An executable loads only onto the devices it was compiled for, in their order.
  return [d.id for d in compiled._executable._unloaded_executable.device_list]


def save(directory: str, key: str, programs: Iterable[tuple[object, object, bool]]) -> float | None:
  """Writes [(program key, jax.stages.Compiled, whether JAX's persistent cache supplied it)] as the
  entry `key`; returns the seconds taken, or None when nothing was written. A program that cannot be
  serialised skips the whole entry (with a warning): a partial entry would be read as complete."""
  t0 = time.time()
  from jax.experimental import serialize_executable

  programs = list(programs)
  here = platform()
  if here not in RESERIALIZABLE_PLATFORMS and any(from_jax_cache for _, _, from_jax_cache in programs):
    logging.info("the sampler's programs were not saved: JAX's cache supplied some, which %s cannot save again", here)
    return None
  try:
    entries = []
    for program_key, compiled, _ in programs:
      blob, in_tree, out_tree = serialize_executable.serialize(compiled)
      entries.append((program_key, blob, in_tree, out_tree, _devices_of(compiled)))
    buffer = io.BytesIO()
    pickle.dump({"format": FORMAT, "key": key, "programs": entries}, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(buffer.getvalue())
      os.replace(tmp, os.path.join(directory, f"{key}.pkl"))  # readers see the whole entry or none
    except BaseException:
      os.unlink(tmp)
      raise
  except Exception as e:  # a cache, not a result: sampling goes on without it
    warnings.warn(f"the sampler's programs were not saved to {directory}: {type(e).__name__}: {e}", stacklevel=2)
    return None
  return time.time() - t0


def has(directory: str, key: str) -> bool:
  """Whether the entry `key` exists (it may still fail to load)."""
  return os.path.exists(os.path.join(directory, f"{key}.pkl"))


def load(directory: str, key: str) -> list[tuple[object, object]] | None:
  """[(program key, jax.stages.Compiled)] of the entry `key`, or None when there is none or it cannot
  be loaded here (then a warning says why)."""
  path = os.path.join(directory, f"{key}.pkl")
  if not os.path.exists(path):
    return None
  from jax.experimental import serialize_executable

  try:
    with open(path, "rb") as f:
      entry = pickle.load(f)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
      raise ValueError("not an entry of this format and key")
    by_id = {d.id: d for d in jax.local_devices()}
    programs = []
    for program_key, blob, in_tree, out_tree, device_ids in entry["programs"]:
      devices = [by_id[i] for i in device_ids]
      programs.append(
        (program_key, serialize_executable.deserialize_and_load(blob, in_tree, out_tree, execution_devices=devices))
      )
    return programs
  except Exception as e:
    warnings.warn(f"ignoring the sampler's saved programs {path}: {type(e).__name__}: {e}", stacklevel=2)
    return None
