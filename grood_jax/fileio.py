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


LOCK_NAME = ".grood.lock"


class DirLock:
  """An exclusive, advisory lock on a directory: one writer (train or score) at a time.

    with lock_dir("runs/x", "--workdir"):
      ...   # a second process on runs/x gets LockError naming this process's PID

  The lock is `fcntl.flock` on `<dir>/.grood.lock` (the file holds the holder's PID and
  command). The kernel drops it when the process dies (SIGKILL included), so a stale lock file
  never blocks a rerun. The directory is created if needed; callers check writability first.
  """

  def __init__(self, path, flag: str = "directory"):
    self.path = os.path.abspath(os.fspath(path))
    self.flag = flag
    self._fd: int | None = None

  def acquire(self) -> "DirLock":
    import fcntl
    import sys
    from grood_jax.errors import LockError, OutputError
    try:
      os.makedirs(self.path, exist_ok=True)
      fd = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
      raise OutputError(f"{self.flag} {self.path}: cannot create its lock file ({e.strerror}); "
                        f"choose another {self.flag}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      try:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
      except OSError:
        holder = "another process"
      os.close(fd)
      raise LockError(f"{self.flag} {self.path} is in use by {holder}; wait for it to finish "
                      f"or choose another {self.flag}") from None
    text = f"PID {os.getpid()} ({' '.join(os.path.basename(a) for a in sys.argv[:1])})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      import fcntl
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "DirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def lock_dir(path, flag: str = "directory") -> DirLock:
  """A `DirLock` on `path` (use as a context manager, or `.acquire()` / `.release()`)."""
  return DirLock(path, flag)
