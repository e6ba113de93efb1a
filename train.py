"""Train a backbone: python train.py --config configs/X.py[:smoke] --workdir runs/x

  --config.FIELD=VALUE   override a config field (unknown fields and wrong types are errors)
  --seed N               override config.seed
  --noprogress           no progress bar
  --distributed          call jax.distributed.initialize() first: on a multi-host TPU/GPU
                         cluster, run this same command on every host (coordinator address,
                         process count and id come from the cluster environment, e.g. TPU
                         pods, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
                         JAX_PROCESS_ID); every host writes to the same --workdir.
  --debug                full tracebacks instead of one-line errors

Rerunning with the same --workdir resumes from its newest readable checkpoint (a process
killed at any moment, even mid-save, loses at most the steps since that checkpoint; the same
seed gives bit-identical parameters). Ctrl-C saves a checkpoint and exits with status 130.
Exit status: 0 done, 2 bad command line, config, data or checkpoint (one line `error: ...`),
1 an internal failure (traceback), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
import warnings

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics.jsonl)")
_SEED = flags.DEFINE_integer("seed", None, "override config.seed")
_PROGRESS = flags.DEFINE_boolean("progress", True, "show a progress bar")
_DISTRIBUTED = flags.DEFINE_boolean("distributed", False, "jax.distributed.initialize() first")
_DEBUG = flags.DEFINE_boolean("debug", False, "show full tracebacks")


class _Fail(Exception):
  def __init__(self, msg: str, code: int = 2):
    super().__init__(msg)
    self.code = code


def _show_warning(message, category, filename, lineno, file=None, line=None):
  """Warnings (e.g. a checkpoint step that fell back) as one line `warning: ...`."""
  del category, filename, lineno, file, line
  print("warning: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  if "Traceback (most recent call last)" in text:   # config_flags embeds the file's traceback
    text = text.splitlines()[-1]
  text = " ".join(text.split())
  m = re.search(r"\[Errno 2\] No such file or directory: '([^']*)'", text)
  if m:
    return f"config file {m.group(1)} does not exist"
  return text or type(e).__name__


def _explain(e: BaseException, argv: list[str]) -> str:
  if isinstance(e, (AttributeError, KeyError)):     # an override names an unknown field
    text = str(e)
    m = re.search(r"'(\w+)\\*'", text)
    key = m.group(1) if m else text.strip("\"' ")
    hint = re.search(r'Did you mean "(\w+)"', text)
    arg = next((a for a in argv if a.startswith("--config.") and key in a.split("=")[0]), None)
    return (f"unknown config field {key!r}" + (f" in {arg.split('=')[0]}" if arg else "")
            + (f" (did you mean {hint.group(1)!r}?)" if hint else
               "; see the config file for the valid fields"))
  return _one_line(e)


def _check_workdir(path: str) -> None:
  """OutputError unless --workdir is, or can be created as, a writable directory. Creates nothing."""
  from grood_jax.fileio import check_writable_dir
  check_writable_dir(path, "--workdir")


def _preflight(config, workdir: str) -> None:
  """Checks the config values and the work directory before anything is created."""
  from grood_jax.data import DataError, benchmark_names
  from grood_jax.errors import ConfigError
  from grood_jax.models import model_names
  from grood_jax.training import create_optimizer, make_loss

  if config.benchmark not in benchmark_names():
    raise DataError(f"unknown benchmark {config.benchmark!r} in config.benchmark; choose from "
                    f"{benchmark_names()}")
  if config.model.name not in model_names():
    raise ConfigError(f"unknown model {config.model.name!r} in config.model.name; choose from "
                      f"{model_names()}")
  for field in ("batch_size", "num_epochs", "checkpoint_every_steps", "eval_batch_size",
                "log_every_steps"):
    if int(config[field]) < 1:
      raise ConfigError(f"config.{field}={config[field]}: must be at least 1")
  for field in ("max_train_samples", "max_eval_samples"):
    if int(config[field]) < 0:
      raise ConfigError(f"config.{field}={config[field]}: must be 0 (all) or positive")
  try:
    make_loss(config)
    create_optimizer(config, 100)
  except ValueError as e:
    raise ConfigError(f"bad config: {' '.join(str(e).split())}") from e
  _check_workdir(workdir)


def main(argv: list[str]) -> int:
  debug = "--debug" in argv
  try:
    with warnings.catch_warnings():
      warnings.showwarning = _show_warning
      return _main(argv, debug)
  except _Fail as e:
    print(f"error: {e}", file=sys.stderr)
    return e.code
  except KeyboardInterrupt:
    print("interrupted before training started; nothing to save", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - the command line turns errors into one line
    from grood_jax.errors import USER_ERRORS
    if debug:
      traceback.print_exc()
    if isinstance(e, USER_ERRORS):
      print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
      return 2
    if not debug:
      traceback.print_exc()
    print(f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())}); please "
          "report it with the traceback above", file=sys.stderr)
    return 1


def _main(argv: list[str], debug: bool) -> int:
  try:
    flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.get("seed")     # a config file that failed to load raises on first use
  except Exception as e:   # flags.Error, and anything the config file raises while loading
    if debug:
      traceback.print_exc()
    raise _Fail(_explain(e, argv)) from None
  if config is None:
    raise _Fail("--config is required (e.g. --config configs/fashion_mnist_cnn.py:smoke)")
  if not _WORKDIR.value:
    raise _Fail("--workdir is required")
  if _SEED.value is not None:
    config.seed = _SEED.value
  _preflight(config, _WORKDIR.value)

  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from grood_jax.training import train

  summary = train(config, _WORKDIR.value, progress=_PROGRESS.value, log=print)
  print("summary: " + json.dumps(summary))
  if summary["interrupted"]:
    print(f"interrupted: checkpoint saved at step {summary['step']}; rerun the same command to "
          "resume", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
