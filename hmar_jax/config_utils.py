"""Loading config files by path (configs/ is a folder of files, not a package) and checking
dotted field names against a config, so that a mistake is named before anything runs."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import re
from collections.abc import Mapping
from types import ModuleType

import ml_collections


def load_module(path: str | os.PathLike) -> ModuleType:
  """Executes the Python file at `path` and returns it as a module.

  Raises FileNotFoundError for a missing file, ValueError for a file that is not Python.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  if not path.endswith(".py"):
    raise ValueError(f"config file {path!r} is not a Python file (expected configs/NAME.py[:variant])")
  name = "hmar_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f"config file {path!r} is not valid Python: {e.msg} (line {e.lineno})") from None
  return module


def sibling(config_file: str, name: str) -> ModuleType:
  """The config module `name` (e.g. 'vqvae') in the same folder as `config_file` (pass __file__)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))


def _missing_file_message(file: str) -> str:
  folder = os.path.dirname(os.path.abspath(file))
  message = f"config file {file!r} not found"
  if os.path.isdir(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_"))
    if names:
      message += f"; {os.path.dirname(file) or '.'}/ holds {', '.join(names)}"
  return message


def load_config_file(spec: str):
  """`get_config(arg)` of 'path/to/config.py[:arg]' (the ml_collections config-file convention).

  Raises FileNotFoundError (no such file) or ValueError (not a Python file, no get_config, a
  variant the file does not have), each naming the file or the variant.
  """
  file, _, arg = spec.partition(":")
  if not os.path.isfile(file):
    raise FileNotFoundError(_missing_file_message(file))
  module = load_module(file)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"config file {file!r} defines no get_config()")
  args = (arg,) if arg else ()
  try:
    inspect.signature(get_config).bind(*args)
  except TypeError:
    raise ValueError(f"config file {file!r} takes no ':variant', got {spec!r}") from None
  try:
    return get_config(*args)
  except ValueError as e:
    raise ValueError(f"{spec}: {e}") from None


# ----------------------------------------------------------------------------- dotted names


def _is_section(node) -> bool:
  return isinstance(node, (ml_collections.ConfigDict, Mapping))


def flat_keys(config, prefix: str = "") -> list[str]:
  """Every dotted name of `config`, sections and fields: ['data', 'data.path', ...]."""
  out = []
  for key in list(config.keys()):
    name = f"{prefix}{key}"
    out.append(name)
    if _is_section(config[key]):
      out.extend(flat_keys(config[key], name + "."))
  return out


def check_field_path(config, dotted: str, prefix: str = "config.") -> None:
  """Raises ValueError if `dotted` ('train.num_steps') names no field of `config`.

  The message gives the full name (`prefix` + dotted) and the nearest valid names (difflib over
  every dotted name of the config), or the valid keys of the section where the name went wrong.
  An index ('shape[0]') is refused for a tuple (config_flags cannot set its entries).
  """
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    if not _is_section(node):
      above = prefix + ".".join(parts[:i])
      raise ValueError(f"{above} is a value ({type(node).__name__}), not a section: {prefix}{dotted} names nothing")
    key = re.sub(r"\[.*\]$", "", part)
    if key not in list(node.keys()):
      # The sections above the mistake are no suggestion for it.
      names = [n for n in flat_keys(config) if not dotted.startswith(n + ".")]
      near = difflib.get_close_matches(dotted, names, n=3, cutoff=0.6)
      if near:
        hint = "did you mean " + " or ".join(prefix + n for n in near) + "?"
      else:
        where = prefix + ".".join(parts[:i]) if i else prefix.rstrip(".")
        hint = f"valid keys in {where}: {', '.join(sorted(node.keys()))}"
      raise ValueError(f"unknown config key {prefix}{dotted}; {hint}")
    node = node[key]
    if key != part and isinstance(node, tuple):
      name = prefix + ".".join(parts[:i] + [key])
      raise ValueError(f"{name} is a tuple, set as a whole (--{name}='(1, 2)'), not by index: {prefix}{dotted}")
