"""Running an absl entry point so that bad input ends in one clear line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with absl logs at WARNING unless --verbosity is given.

  A ValueError, FileNotFoundError or FileExistsError (bad config, shapes or files, raised before
  anything expensive) prints 'error: ...' on stderr and exits with status 2.
  """

  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO, drowning the progress bars
    try:
      return main(argv)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
      print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)
