"""Running an absl entry point so that bad input ends in one clear line, not a traceback.

Bad input found while parsing the command line (an unknown flag, a value of the wrong type, a
config file that is missing or not Python, a config variant the file does not have, a
`--config.a.b` override naming no field) and bad input found by main() (ValueError,
FileNotFoundError, FileExistsError, absl's UsageError) all end the same way: one line
'error: ...' on stderr and exit status 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from hmar_jax import config_utils
from hmar_jax.compile_cache import enable_compilation_cache

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a scheduler expects of a job it terminated


class CommandLineError(ValueError):
  """A command line that cannot run; the message names the flag."""


def stop_report(result: dict) -> tuple[int, str] | None:
  """(exit status, the one line to print) for a run stopped by a signal, None for a finished run."""
  if not result.get("preempted"):
    return None
  by = result.get("stopped_by") or "preemption"
  where = result.get("checkpoint_dir") or "the workdir's checkpoints"
  line = f"stopped by {by} at step {result['step']}: checkpoint saved in {where}; rerun the same command to resume"
  return (EXIT_INTERRUPTED if by == "SIGINT" else EXIT_PREEMPTED), line


def fail(message: str) -> NoReturn:
  """Prints 'error: message' (one line) on stderr and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def config_file_flags(flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Names of the flags defined with ml_collections' DEFINE_config_file."""
  return [
    name
    for name in flag_values
    if isinstance(flag_values[name].parser, config_flags.ConfigFileFlagParser) and name == flag_values[name].name
  ]


def _config_spec(argv: Sequence[str], name: str) -> str | None:
  """The value of the last --name=SPEC (or --name SPEC) in argv."""
  spec = None
  for i, arg in enumerate(argv):
    if re.fullmatch(rf"--?{re.escape(name)}=.*", arg):
      spec = arg.split("=", 1)[1]
    elif re.fullmatch(rf"--?{re.escape(name)}", arg) and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """The dotted fields of every --name.a.b[=v] / --noname.a.b in argv ('a.b')."""
  out = []
  for arg in argv:
    m = re.fullmatch(rf"--?(?:no)?{re.escape(name)}\.([^=]+)(?:=.*)?", arg)
    if m:
      out.append(m.group(1))
  return out


def check_config_arguments(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Loads each config file named on the command line and checks every override against it.

  Raises FileNotFoundError (no such config file) or ValueError (not a Python file, an unknown
  variant, an override naming no field: with the nearest valid names), naming the flag.
  """
  for name in config_file_flags(flag_values):
    spec = _config_spec(argv, name)
    overrides = _overrides(argv, name)
    if spec is None:
      if overrides:
        raise CommandLineError(f"--{name}.{overrides[0]} needs --{name}=FILE.py[:variant] before it")
      continue
    try:
      config = config_utils.load_config_file(spec)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"--{name}: {e}") from None
    except ValueError as e:
      raise CommandLineError(f"--{name}: {e}") from None
    for dotted in overrides:
      config_utils.check_field_path(config, dotted, prefix=f"{name}.")


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` (program name first) into `flag_values`; returns the arguments left over.

  Every problem raises ValueError (CommandLineError, or an unknown config key with the nearest
  valid names) or FileNotFoundError with one message naming the flag, never a traceback of the
  flag machinery.
  """
  argv = list(argv)
  try:
    expanded = flag_values.read_flags_from_files(argv, force_gnu=False)
  except flags.Error as e:
    raise CommandLineError(str(e)) from None
  check_config_arguments(expanded, flag_values)
  try:
    return flag_values(argv)
  except flags.Error as e:
    message = str(e)
    if isinstance(e, flags.UnrecognizedFlagError):
      message += "; --helpshort lists the flags"
    raise CommandLineError(message) from None
  except (LookupError, AttributeError, TypeError, ValueError, OSError) as e:
    # Raised by a config file or config_flags while applying overrides.
    raise CommandLineError(f"{type(e).__name__}: {e}") from None


def _with_default_configs(argv: list[str], defaults: Mapping[str, str]) -> list[str]:
  """argv with --name=SPEC inserted right after the program name for each config flag the
  command line does not set (before any --name.a.b override, as config_flags requires)."""
  for name, spec in defaults.items():
    if _config_spec(argv, name) is None:
      argv = argv[:1] + [f"--{name}={spec}"] + argv[1:]
  return argv


def run(main: Callable[[list[str]], None], *, default_configs: Mapping[str, str] | None = None) -> None:
  """`absl.app.run(main)` with one-line errors, absl logs at WARNING unless --verbosity is given, and
  JAX's persistent compilation cache on (hmar_jax.compile_cache).

  default_configs: {flag name: 'file.py[:variant]'} for config-file flags defined with no default
    (a default given to DEFINE_config_file is loaded, overrides and all, when the module is
    imported: before any error can be caught here).

  A bad command line, or a ValueError, FileNotFoundError, FileExistsError or UsageError raised in
  main() (bad config, shapes or files, raised before anything expensive) prints 'error: ...' on
  stderr and exits with status 2.
  """
  argv = list(sys.argv)
  if default_configs:
    argv = _with_default_configs(argv, default_configs)
    sys.argv[:] = argv  # config_flags reads the overrides from sys.argv itself

  def parse(args):
    try:
      return parse_flags(args)
    except (ValueError, FileNotFoundError) as e:
      fail(str(e))

  def guarded(args):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO, drowning the progress bars
    enable_compilation_cache()  # a rerun loads what the first run compiled
    try:
      return main(args)
    except app.UsageError as e:
      fail(f"{e}; --helpshort lists the flags")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
      fail(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and returns by itself)
      print("interrupted", file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)

  app.run(guarded, argv=argv, flags_parser=parse)
