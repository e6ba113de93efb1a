"""Every exception grood_jax raises on purpose, in one leaf module (it imports nothing).

`UserError` is the base of bad input a user can fix — data, detectors, checkpoints, configs,
conversions, output paths. The command lines print `error: <message>` (one line) and exit with
status 2; library callers can catch `grood_jax.UserError` (a ValueError) once.

`ScoringError` is not the user's input: a model or detector that produced non-finite scores.
The command lines print it on one line too, but exit with status 1 (an internal failure).
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input the user can fix; the message says what to fix."""


class DataError(UserError):
  """A data set, image source or benchmark that cannot be used as given."""


class DetectorError(UserError):
  """Unknown detector or parameter, or a detector that cannot run: the message says why."""


class CheckpointError(UserError):
  """A checkpoint directory that is missing, unreadable or not a grood_jax checkpoint."""


class ConfigError(UserError):
  """A training config value that cannot work (unknown loss, optimizer, model, ...)."""


class ConversionError(UserError):
  """Weights that cannot be converted to a grood_jax model."""


class OutputError(UserError):
  """An output path that cannot be written."""


class LockError(UserError):
  """A directory another process is writing to (its lock is held)."""


class ScoringError(RuntimeError):
  """A detector or model failed on valid input (e.g. NaN/Inf scores): not a user error."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
