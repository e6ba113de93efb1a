"""Progress reporting, one protocol for the library: a `ProgressFn(desc, total, unit)` returns
a `Bar` with `update(n)` and `close()`.

Library code never prints: it asks its caller's ProgressFn for a bar (the command line passes
tqdm bars on a terminal and plain lines otherwise; the default, `no_progress`, shows nothing).
Inner loops (feature batches, gradient batches, kNN query blocks) take a plain
`Callable[[int], None]` (a bar's `update`) so that the maths modules need not know about bars.
"""

from __future__ import annotations

from typing import Callable, Protocol


class Bar(Protocol):
  def update(self, n: int = 1) -> None: ...
  def close(self) -> None: ...


class _NoBar:
  def update(self, n: int = 1) -> None:
    pass

  def close(self) -> None:
    pass


def no_progress(desc: str, total: int, unit: str = "it") -> Bar:
  """The default progress callback: shows nothing."""
  del desc, total, unit
  return _NoBar()


ProgressFn = Callable[[str, int, str], Bar]
