"""Atomic file writes: a temporary file beside the target, then one rename over it.

A crash mid-write leaves the previous file intact and no partial file under the real name.
Files get the usual permissions (0666 less the process umask), not mkstemp's 0600.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path, write: Callable, *, suffix: str = ".tmp") -> str:
  """Calls write(f) on a binary temporary file beside `path`, then renames it over `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                             suffix=suffix)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  return path


def atomic_write_text(path, text: str) -> str:
  return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
