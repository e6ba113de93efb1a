"""What every command line shares: one-line errors, one-line warnings, exit statuses.

  sys.exit(run_cli(lambda: work(args), debug=args.debug, interrupted="..."))

Exit status: 0 done, 2 bad input (`UserError`: one line `error: ...`, nothing written),
1 an internal failure (`ScoringError`: one line; anything else: its traceback, then one line),
130 interrupted (Ctrl-C). `debug=True` prints the traceback of any error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from typing import Callable

from grood_jax.errors import USER_ERRORS, ScoringError


def one_line(e: BaseException | str) -> str:
  """The message of `e` on one line (its type name when it has none)."""
  text = " ".join(str(e).split())
  return text or type(e).__name__


def warning_line(message, category, filename, lineno) -> str:
  """One line for a warning: our own (raised from grood_jax) as `warning: <message>`, any
  other with where it comes from: `warning: <message> [DeprecationWarning, pkg/mod.py:12]`."""
  text = f"warning: {one_line(message)}"
  ours = os.sep + "grood_jax" + os.sep in os.path.abspath(str(filename))
  if not ours:
    parts = os.path.normpath(str(filename)).split(os.sep)
    text += f" [{getattr(category, '__name__', category)}, {'/'.join(parts[-2:])}:{lineno}]"
  return text


def show_warning(message, category, filename, lineno, file=None, line=None):
  """`warnings.showwarning` replacement: `warning_line` on stderr, written through tqdm so
  that it never lands inside a progress bar."""
  del file, line
  from tqdm import tqdm
  tqdm.write(warning_line(message, category, filename, lineno), file=sys.stderr)


def error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


def run_cli(work: Callable[[], int], *, debug: bool = False,
            interrupted: str = "interrupted") -> int:
  """Runs `work()` with one-line warnings and turns every exception into an exit status."""
  try:
    with warnings.catch_warnings():
      warnings.showwarning = show_warning
      return work()
  except KeyboardInterrupt:
    print(interrupted, file=sys.stderr)
    return 130
  except BrokenPipeError:          # the reader went away (e.g. `| head`): not an error of ours
    return 141
  except Exception as e:  # noqa: BLE001 - the command line turns errors into one line
    if debug:
      traceback.print_exc()
    if isinstance(e, USER_ERRORS):
      error(one_line(e))
      return 2
    if isinstance(e, ScoringError):
      error(one_line(e) + ("" if debug else " (--debug shows the traceback)"))
      return 1
    if not debug:
      traceback.print_exc()
    error(f"internal error ({type(e).__name__}: {one_line(e)}); please report it with the "
          "traceback above")
    return 1


class Parser(argparse.ArgumentParser):
  """argparse with a one-line error (`error: ...`, exit status 2) instead of usage + error."""

  def error(self, message):
    self.exit(2, f"error: {message} (see --help)\n")
