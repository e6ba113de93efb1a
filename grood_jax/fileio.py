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


def check_writable_dir(path, flag: str) -> None:
  """OutputError unless `path` is, or can be created as, a writable directory. Creates nothing.

  `flag` names the option in the message (e.g. "--out"), which says what to fix.
  """
  from grood_jax.errors import OutputError
  full = os.path.abspath(os.fspath(path))
  if os.path.exists(full):
    if not os.path.isdir(full):
      raise OutputError(f"{flag} {path}: a file, not a directory; choose another {flag}")
    if not os.access(full, os.W_OK | os.X_OK):
      raise OutputError(f"{flag} {path}: the directory is not writable; choose another {flag}")
    return
  parent = os.path.dirname(full)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise OutputError(f"{flag} {path}: cannot create the directory, {parent} is a file; "
                      f"choose another {flag}")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"{flag} {path}: cannot create the directory, {parent} is not writable; "
                      f"choose another {flag}")
