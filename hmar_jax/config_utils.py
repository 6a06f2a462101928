"""Loading config files by path: configs/ is a folder of files, not a package."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def load_module(path: str | os.PathLike) -> ModuleType:
  """Executes the Python file at `path` and returns it as a module."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  name = "hmar_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str) -> ModuleType:
  """The config module `name` (e.g. 'vqvae') in the same folder as `config_file` (pass __file__)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))


def load_config_file(spec: str):
  """`get_config(arg)` of 'path/to/config.py[:arg]' (the ml_collections config-file convention)."""
  file, _, arg = spec.partition(":")
  module = load_module(file)
  return module.get_config(arg) if arg else module.get_config()
