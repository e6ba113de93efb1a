"""The errors a user can fix. Library code raises these; the command lines print one line."""

from __future__ import annotations


class OutputError(ValueError):
  """An output path that cannot be written."""


def _user_errors() -> tuple[type[BaseException], ...]:
  from grood_jax.data.base import DataError
  from grood_jax.detectors.base import DetectorError
  errs: list[type[BaseException]] = [DataError, DetectorError, OutputError]
  try:
    from grood_jax.checkpoint import CheckpointError
    errs.append(CheckpointError)
  except ImportError:
    pass
  return tuple(errs)


def __getattr__(name):
  if name == "USER_ERRORS":
    return _user_errors()
  raise AttributeError(name)
