"""Parameter checkpoints through orbax (training state: hmar_jax/training/checkpointing.py).

Everything is stored as a nested dict of arrays (NNX's "pure dict" form), so a
checkpoint does not depend on module classes, and a mismatch between checkpoint and
model is reported key by key before anything is loaded. Orbax writes into a temporary
directory and renames it when complete, so an interrupted save never leaves a
half-written checkpoint behind.

Integrity: save_params records a CRC-32 of every array's bytes (hmar_jax_checksums.json, written
atomically before the arrays); restoring recomputes them and refuses a checkpoint whose bytes
changed on disk, any float array holding NaN / Inf, and data files TensorStore cannot read (cut
short, overwritten), each with one CheckpointCorruptError naming the checkpoint and the array.
Checkpoints written before checksums existed are checked for NaN / Inf only.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

_PARAMS_DIR = "params"
_META_FILE = "hmar_jax_meta.json"
_CHECKSUM_FILE = "hmar_jax_checksums.json"
# Arrays are stored in chunks of at most this many bytes, which TensorStore reads side by side; one
# chunk per array (orbax's default) reads a d16 transformer's 1.7 GB in 2.6 s on 2 CPU cores, 16 MiB
# chunks in 1.7 s.
PARAMS_CHUNK_BYTES = 16 << 20


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree does not match the model it is loaded into."""


class CheckpointCorruptError(ValueError):
  """A checkpoint's data cannot be read, changed on disk since it was saved, or holds NaN / Inf."""


class CheckpointWriteError(ValueError):
  """A checkpoint could not be written (read-only or full disk); names the directory and the OS error."""


# ----------------------------------------------------------------------------- error reporting


def _exception_chain(e: BaseException) -> list[BaseException]:
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  return chain


def describe_os_error(e: BaseException) -> str | None:
  """The operating-system error behind a failed write, e.g. '[Errno 28] No space left on device', or None.

  Python raises OSError; TensorStore (orbax's array writer) raises ValueError with the code in its
  text ("... No space left on device [os_error_code='28']").
  """
  for x in _exception_chain(e):
    if isinstance(x, OSError) and x.errno:
      return f"[Errno {x.errno}] {x.strerror or os.strerror(x.errno)}"
  for x in _exception_chain(e):
    m = re.search(r"os_error_code='?(\d+)", str(x))
    if m:
      code = int(m.group(1))
      return f"[Errno {code}] {os.strerror(code)}"
  return None


def describe_read_error(e: BaseException) -> str:
  """One line about why orbax / TensorStore could not read a checkpoint, naming the array when the
  error does (TensorStore: 'Error reading "params.w/0.0" ...', or in an OCDBT database 'Error reading
  shard entry {0, 0}/{1, 1} in "params.w/c/0/0" ...'). The full chain stays in __cause__."""
  texts = [str(x).strip() for x in _exception_chain(e)]
  for text in texts:
    m = re.search(r'Error reading (?:shard entry [^"]*? in )?"([^"/]+)/', text)
    if m:  # orbax names arrays by their key path joined with '.'
      detail = re.sub(r"^([A-Z_]+: )+", "", text.splitlines()[0])
      return f"array {m.group(1).replace('.', '/')} cannot be read ({_shorten(detail)})"
  first = next((t.splitlines()[0] for t in reversed(texts) if t), type(e).__name__)
  return _shorten(first)


def _shorten(text: str, limit: int = 300) -> str:
  return text if len(text) <= limit else text[: limit - 3] + "..."


class OrbaxFailureLogFilter(logging.Filter):
  """Drops the ERROR records of a failing orbax save while installed: a traceback from each of
  orbax's save threads (logged through the 'absl' logger) and asyncio's 'Task exception was never
  retrieved' for each of its write tasks still in flight. The failure reaches the caller as one
  clear exception instead of hundreds of lines of thread and asyncio tracebacks."""

  _LOGGERS = ("absl", "asyncio")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
      return False
    return not (record.name == "asyncio" and "orbax" in record.getMessage())

  def __enter__(self):
    for name in self._LOGGERS:
      logging.getLogger(name).addFilter(self)
    return self

  def __exit__(self, *exc):
    for name in self._LOGGERS:
      logging.getLogger(name).removeFilter(self)
    return False


_AFTER_FAILURE = OrbaxFailureLogFilter()


def quiet_after_write_failure() -> None:
  """Keeps orbax's failure logs quiet for the rest of the process, once a write failure has been
  raised: orbax's write tasks still in flight report the same failure again as they end (or are
  garbage collected), after the clear error has been printed."""
  ignore_closed_loop_callbacks()
  _AFTER_FAILURE.__enter__()  # idempotent: a logger holds a filter once


def ignore_closed_loop_callbacks() -> None:
  """After a failed save, TensorStore completes the writes still in flight and calls back into the
  asyncio loop orbax has already closed; each call prints a 'RuntimeError: Event loop is closed'
  traceback through sys.unraisablehook. The failure itself is raised as one clear error, so these
  (and only these) are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and unraisable.object is None:
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


# ----------------------------------------------------------------------------- checksums


def array_crc32(x: Any) -> int:
  """CRC-32 of an array's C-order bytes (the same value for the same dtype, shape and contents)."""
  a = np.ascontiguousarray(np.asarray(x))
  return zlib.crc32(a.reshape(-1).view(np.uint8))


def _is_float(dtype) -> bool:
  return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


def verify_arrays(where: str, arrays: Mapping[str, Any], checksums: Mapping[str, Any] | None) -> None:
  """Raises CheckpointCorruptError naming `where` and the first bad array of `arrays` ({key: host array}).

  checksums: {key: {'crc32': int, 'dtype': str}} recorded at save time, or None for checkpoints
  written without them (then only NaN / Inf is looked for). The arrays are checked side by side in
  threads (zlib and numpy release the GIL on large buffers); the error names the first bad one in
  `arrays`' order whatever the threads' order.
  """
  items = list(arrays.items())
  workers = max(1, min(8, os.cpu_count() or 1, len(items)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    problems = list(pool.map(lambda item: _array_problem(where, *item, checksums), items))
  for problem in problems:
    if problem is not None:
      raise CheckpointCorruptError(problem)


def _array_problem(where: str, key: str, x: Any, checksums: Mapping[str, Any] | None) -> str | None:
  """What is wrong with one restored array (a checksum mismatch, NaN / Inf), or None."""
  x = np.asarray(x)
  record = None if checksums is None else checksums.get(key)
  if record is not None:
    stored = x.astype(jax.numpy.dtype(record["dtype"])) if str(x.dtype) != record["dtype"] else x
    if array_crc32(stored) != int(record["crc32"]):
      return (
        f"checkpoint {where} is corrupt: array {key} does not match the checksum recorded when it was "
        "saved (its data file changed on disk); restore a copy of the checkpoint or save it again"
      )
  if _is_float(x.dtype):
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
      why = (
        "it was saved that way (the run it came from had diverged)"
        if record is not None
        else "the checkpoint is damaged or was saved from a diverged run"
      )
      return f"checkpoint {where}: array {key} holds {bad} NaN/Inf value(s) of {x.size}; {why}; refusing to load it"
  return None


def remove_until_settled(find: Callable[[], list[str]], *, quiet_s: float = 0.3, timeout_s: float = 10.0) -> bool:
  """Removes the folders `find()` lists until it has listed none for `quiet_s` seconds.

  After a failed write orbax reports the first error and stops waiting, but TensorStore's array writes
  already under way go on in native threads and recreate their parent folders when they land, so a
  single rmtree can be undone a moment later. Returns whether nothing is left at the end.
  """
  deadline = time.monotonic() + timeout_s
  clear_since = None
  while True:
    paths = [p for p in find() if os.path.lexists(p)]
    for path in paths:
      shutil.rmtree(path, ignore_errors=True)
    now = time.monotonic()
    if paths:
      clear_since = None
    elif clear_since is None:
      clear_since = now
    elif now - clear_since >= quiet_s:
      return True
    if now >= deadline:  # unsettled: whatever keeps writing may still be at it
      return not paths and not [p for p in find() if os.path.lexists(p)]
    time.sleep(0.02)


def _write_json_atomically(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _load_checksums(directory: str) -> dict | None:
  path = os.path.join(directory, _CHECKSUM_FILE)
  if not os.path.exists(path):
    return None  # written before checksums existed
  try:
    with open(path) as f:
      return dict(json.load(f)["arrays"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(
      f"checkpoint {directory}: its checksum file {_CHECKSUM_FILE} is unreadable ({e})"
    ) from e


def process_local_checkpointer() -> ocp.StandardCheckpointer:
  """A checkpointer that reads / writes from this process alone (no barrier with other processes):
  parameter checkpoints hold host arrays that one process writes (process 0) or every process reads."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(
    multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  )


def uncompressed_params_writer() -> ocp.Checkpointer:
  """`process_local_checkpointer`'s layout (OCDBT, zarr3) without zstd: trained weights hardly
  compress (a d16 transformer's 1.9 GB of float32 took 1.7 GB compressed, 1.8 GB not) and reading
  skips the decompression (0.7 instead of 1.5 s for that checkpoint on 2 CPU cores). Read back with
  `process_local_checkpointer`, which reads either."""
  me = jax.process_index()
  options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  handler = ocp.PyTreeCheckpointHandler(
    use_ocdbt=True, use_zarr3=True, use_compression=False, multiprocessing_options=options
  )
  return ocp.Checkpointer(handler, multiprocessing_options=options)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def _pure_state(module_or_state: Any, variable_filter=nnx.Param) -> dict:
  if isinstance(module_or_state, nnx.Module):
    module_or_state = nnx.state(module_or_state, variable_filter)
  if isinstance(module_or_state, nnx.State):
    return nnx.to_pure_dict(module_or_state)
  if isinstance(module_or_state, Mapping):
    return dict(module_or_state)
  raise TypeError(f"expected an nnx.Module, nnx.State or dict, got {type(module_or_state).__name__}")


def compare_trees(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
  """Lists, by key path, what differs between two nested dicts of arrays/shape-structs.

  Returns:
    Human-readable problems ('missing key a/b', 'unexpected key c', 'shape of d: ...'); empty if they match.
  """
  want, got = _flatten(expected), _flatten(found)
  problems = [f"missing key {k}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected key {k}" for k in sorted(got.keys() - want.keys())]
  for k in sorted(want.keys() & got.keys()):
    ws, gs = tuple(np.shape(want[k])), tuple(np.shape(got[k]))
    if ws != gs:
      problems.append(f"shape of {k}: checkpoint has {gs}, model expects {ws}")
  return problems


def save_params(
  directory: str | os.PathLike,
  module_or_state: Any,
  *,
  metadata: Mapping[str, Any] | None = None,
  variable_filter=nnx.Param,
) -> str:
  """Saves a module's variables (default: nnx.Param) as an orbax checkpoint.

  Args:
    directory: destination folder; must not exist yet (nothing is overwritten).
    module_or_state: an nnx.Module, an nnx.State, or a nested dict of arrays.
    metadata: optional JSON-serialisable facts stored beside the arrays (e.g. the config).
    variable_filter: which NNX variables to save when given a module.
  Returns:
    The absolute path written.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"checkpoint destination {directory} already exists; refusing to overwrite it")
  tree = _pure_state(module_or_state, variable_filter)
  checksums = {
    key: {"crc32": array_crc32(x), "dtype": str(np.asarray(x).dtype), "shape": list(np.shape(x))}
    for key, x in _flatten(tree).items()
    if hasattr(x, "dtype")
  }
  try:
    os.makedirs(directory)
  except OSError as e:
    raise CheckpointWriteError(f"cannot create the checkpoint directory {directory}: {describe_os_error(e)}") from e
  try:
    # The checksums go in first: a checkpoint holding arrays then always holds their checksums.
    _write_json_atomically(
      os.path.join(directory, _CHECKSUM_FILE), {"format": "crc32 of C-order bytes", "arrays": checksums}
    )
    ignore_closed_loop_callbacks()
    with OrbaxFailureLogFilter(), uncompressed_params_writer() as ckptr:
      chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=PARAMS_CHUNK_BYTES), tree)
      ckptr.save(os.path.join(directory, _PARAMS_DIR), args=ocp.args.PyTreeSave(tree, save_args=chunked))
    _write_json_atomically(os.path.join(directory, _META_FILE), dict(metadata or {}))
  except Exception as e:
    removed = remove_until_settled(lambda: [directory])  # ours (created above): leave nothing half-written
    reason = describe_os_error(e)
    if reason is None:
      raise
    quiet_after_write_failure()
    hint = " (free some space)" if f"Errno {errno.ENOSPC}]" in reason else ""
    kept = "nothing was kept" if removed else f"remove the partial folder {directory} by hand"
    raise CheckpointWriteError(f"could not write the checkpoint {directory}: {reason}{hint}; {kept}") from e
  return directory


def load_metadata(directory: str | os.PathLike) -> dict:
  path = os.path.join(os.fspath(directory), _META_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def restore_params(
  directory: str | os.PathLike, module: nnx.Module, *, variable_filter=nnx.Param, on_host: bool = False
) -> nnx.Module:
  """Loads parameters saved by `save_params` into `module` in place (and returns it).

  The checkpoint's key paths and shapes are compared with the module's first; any
  missing, unexpected or mis-shaped key raises CheckpointMismatchError naming it. Every
  array is then read to the host and checked (its checksum, NaN / Inf), so a damaged
  checkpoint raises CheckpointCorruptError naming the array. Either way the module is left
  untouched.

  on_host: leave the arrays in host memory as numpy (in the module's dtypes), for a caller that
  rearranges them before putting them on a device once (see `place_params`).
  """
  state = nnx.state(module, variable_filter)
  target = nnx.to_pure_dict(state)
  host = read_params(directory, target)
  nnx.replace_by_pure_dict(state, host if on_host else _place_like(target, host))
  nnx.update(module, state)
  return module


def read_params(directory: str | os.PathLike, target: Any) -> dict:
  """The checkpoint's arrays as host numpy in `target`'s structure and dtypes (a pure dict of arrays
  or ShapeDtypeStructs), after checking its keys and shapes against `target` and each array's
  checksum (CheckpointMismatchError / CheckpointCorruptError naming the problem)."""
  directory = os.path.abspath(os.fspath(directory))
  stored_tree = _stored_tree_matching(directory, target)
  host = _as_dict_like(target, _restore_verified(directory, stored_tree))
  return jax.tree.map(lambda like, x: np.asarray(x, dtype=like.dtype), target, host)


def check_params(directory: str | os.PathLike, module_or_tree: Any, *, variable_filter=nnx.Param) -> None:
  """Raises as `restore_params` would for a checkpoint that does not fit `module_or_tree` (a module,
  which may be abstract, or a pure dict of arrays / ShapeDtypeStructs: only shapes are read),
  reading the checkpoint's metadata only, no array."""
  directory = os.path.abspath(os.fspath(directory))
  tree = module_or_tree
  if isinstance(tree, nnx.Module):
    tree = nnx.to_pure_dict(nnx.state(tree, variable_filter))
  _stored_tree_matching(directory, tree)


def _stored_tree_matching(directory: str, target: Any) -> Any:
  """The checkpoint's stored array metadata, after checking its keys and shapes against `target`."""
  path = os.path.join(directory, _PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} is not an hmar_jax parameter checkpoint (no '{_PARAMS_DIR}/' inside)")
  with process_local_checkpointer() as ckptr:
    stored = ckptr.metadata(path)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
  problems = compare_trees(target, _as_dict(stored_tree))
  if problems:
    raise CheckpointMismatchError(
      f"checkpoint {directory} does not match the model: "
      + "; ".join(problems[:20])
      + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else "")
    )
  return stored_tree


def place_params(module: nnx.Module, params: Mapping[str, Any], *, variable_filter=nnx.Param) -> nnx.Module:
  """Puts the host arrays of `params` (a pure dict shaped like the module's state) where the module's
  arrays live, in their dtypes, and into the module (returned). Raises CheckpointMismatchError naming
  any key or shape that differs, before anything is copied."""
  state = nnx.state(module, variable_filter)
  target = nnx.to_pure_dict(state)
  problems = compare_trees(target, _as_dict(params))
  if problems:
    raise CheckpointMismatchError("parameters do not match the model: " + "; ".join(problems[:20]))
  nnx.replace_by_pure_dict(state, _place_like(target, _as_dict_like(target, _as_dict(params))))
  nnx.update(module, state)
  return module


def _restore_verified(directory: str, stored_tree: Any) -> dict:
  """Every array of the checkpoint as host numpy in its stored dtype, checked against its checksum
  and for NaN / Inf (CheckpointCorruptError naming the array otherwise)."""
  path = os.path.join(directory, _PARAMS_DIR)
  checksums = _load_checksums(directory)
  # Zero-filled host targets cost no memory until orbax writes into them (the pages are untouched).
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), stored_tree)
  try:
    with OrbaxFailureLogFilter(), process_local_checkpointer() as ckptr:
      restored = ckptr.restore(path, target)
  except Exception as e:  # noqa: BLE001 - TensorStore reports damaged files as plain Exception / ValueError
    raise CheckpointCorruptError(
      f"checkpoint {directory} is damaged and cannot be read: {describe_read_error(e)}; restore a copy of it or "
      "write it again"
    ) from e
  tree = _as_dict(jax.tree.map(np.asarray, restored))
  verify_arrays(directory, _flatten(tree), checksums)
  return tree


def _as_dict_like(target: Any, tree: Any) -> Any:
  """`tree` (string keys) restructured with `target`'s keys (which may be ints, for list groups)."""
  if isinstance(target, Mapping):
    return {k: _as_dict_like(v, tree[k] if k in tree else tree[str(k)]) for k, v in target.items()}
  return tree


def _place_like(target: Any, host: Any) -> Any:
  """The host arrays of `host` put where `target`'s arrays (model variables' arrays or
  ShapeDtypeStructs) live, in their dtypes.

  Arrays without a sharding go to the default device in one device_put, which copies them side by
  side (on CPU, 400 MB in 0.11 s against 0.37 s for one jnp.asarray per array).
  """
  likes, treedef = jax.tree.flatten(target)
  hosts = treedef.flatten_up_to(host)
  placed: list[Any] = [None] * len(likes)
  unsharded = []
  for i, (like, x) in enumerate(zip(likes, hosts, strict=True)):
    x = np.asarray(x, dtype=like.dtype) if x.dtype != like.dtype else x
    sharding = getattr(like, "sharding", None)
    if sharding is None:
      unsharded.append((i, x))
    else:  # also right when the model is spread over the devices of several processes
      placed[i] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
  for (i, _), array in zip(unsharded, jax.device_put([x for _, x in unsharded]), strict=True):
    placed[i] = array
  return jax.tree.unflatten(treedef, placed)


def read_params_tree(directory: str | os.PathLike) -> dict:
  """Every array of a `save_params` checkpoint as host numpy, as a nested dict (list groups keyed
  by index strings '0', '1', ...)."""
  directory = os.path.abspath(os.fspath(directory))
  path = os.path.join(directory, _PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} is not an hmar_jax parameter checkpoint (no '{_PARAMS_DIR}/' inside)")
  with process_local_checkpointer() as ckptr:
    stored = ckptr.metadata(path)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
  return _restore_verified(directory, stored_tree)


def _as_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
    return {str(i): _as_dict(v) for i, v in enumerate(tree)}
  return tree
