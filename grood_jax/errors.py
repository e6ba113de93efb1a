"""The errors the command lines turn into one line.

User errors (`USER_ERRORS`): bad input the user can fix — data, detectors, checkpoints, configs,
output paths. The command lines print `error: <message>` and exit with status 2.

`ScoringError` is not the user's input: a model or detector that produced non-finite scores.
score.py prints it on one line too, but exits with status 1 (an internal failure), like any
other unexpected exception (which also prints its traceback).
"""

from __future__ import annotations


class OutputError(ValueError):
  """An output path that cannot be written."""


class ConfigError(ValueError):
  """A training config value that cannot work (unknown loss, optimizer, model, ...)."""


class ScoringError(RuntimeError):
  """A detector or model failed on valid input (e.g. NaN/Inf scores): not a user error."""


def _user_errors() -> tuple[type[BaseException], ...]:
  from grood_jax.data.base import DataError
  from grood_jax.detectors.base import DetectorError
  errs: list[type[BaseException]] = [DataError, DetectorError, OutputError, ConfigError]
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
