"""Train a backbone: grood-train --config NAME|configs/X.py[:smoke] --workdir runs/x

  (also: python train.py ... in a clone, or python -m grood_jax.cli.train ...)
  NAME is a packaged config (fashion_mnist_6v4_cnn, fashion_mnist_cnn, ..._greg, ..._gregplus).

  --config.FIELD=VALUE   override a config field (unknown fields and wrong types are errors)
  --seed N               override config.seed (an integer in [0, 2**31 - 2])
  --allow-config-change  resume although the config differs from the checkpoint's in a field
                         that changes the run (the change is recorded in the checkpoints);
                         without it such a rerun is refused with the list of differing fields.
                         Logging/progress/checkpoint cadence, eval_batch_size, data_dir,
                         devices and init_from may always differ.
  --notensorboard        no TensorBoard event files (<workdir>/tb/); metrics.jsonl stays
  --noprogress           no progress bar
  --distributed          run as one of several processes: jax.distributed.initialize() first.
                         Run this same command on every process. The coordinator address,
                         process count and id are auto-detected on TPU pods, SLURM (srun),
                         Open MPI (mpirun) and Kubernetes jobs (JAX_COORDINATOR_ADDRESS is
                         also read), or given explicitly:
  --coordinator HOST:PORT --num-processes N --process-id I
                         (each implies --distributed; process 0 listens on HOST:PORT). Every
                         process reads the same data and uses the same --workdir (a shared
                         file system); process 0 alone logs, holds the lock and writes
                         metrics.jsonl and the event files. A missing value is a one-line
                         error naming it.
  --debug                full tracebacks instead of one-line errors, and orbax's own log
                         output (silenced otherwise)

Every value is checked before any data is loaded, and the data (e.g. a batch larger than the
training set) before the work directory is created. The process holds a lock on --workdir
(`<workdir>/.grood.lock`) for the whole run: a second train on the same directory stops at
once with an error naming the holder's PID.

Rerunning with the same --workdir resumes from its newest readable checkpoint (a process
killed at any moment, even mid-save, loses at most the steps since that checkpoint; the same
seed gives bit-identical parameters). Ctrl-C saves a checkpoint and exits with status 130.
Writes <workdir>/metrics.jsonl (one line per epoch) and TensorBoard event files in
<workdir>/tb/ (`tensorboard --logdir <workdir>/tb`; see grood_jax.training.writers).

Exit status: 0 done; 2 bad command line, config, data or checkpoint, a locked work directory,
a checkpoint that cannot be written (disk full), or a diverged run (a non-finite loss or
parameters: the newest checkpoint keeps the last finite parameters) — one line `error: ...`;
1 an internal failure (traceback); 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
import warnings

from absl import flags
from ml_collections import config_flags

from grood_jax import configs
from grood_jax.cli.common import run_cli
from grood_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics.jsonl)")
_SEED = flags.DEFINE_integer("seed", None, "override config.seed")
_PROGRESS = flags.DEFINE_boolean("progress", True, "show a progress bar")
_DISTRIBUTED = flags.DEFINE_boolean("distributed", False, "jax.distributed.initialize() first")
_COORDINATOR = flags.DEFINE_string("coordinator", None,
                                   "with --distributed: HOST:PORT of process 0 (same everywhere)")
_NUM_PROCESSES = flags.DEFINE_integer("num-processes", None,
                                      "with --distributed: the number of processes")
_PROCESS_ID = flags.DEFINE_integer("process-id", None,
                                   "with --distributed: this process's id, 0..N-1")
_ALLOW_CHANGE = flags.DEFINE_boolean("allow-config-change", False,
                                     "resume although the config differs from the checkpoint's")
_TENSORBOARD = flags.DEFINE_boolean("tensorboard", True, "write TensorBoard event files")
_DEBUG = flags.DEFINE_boolean("debug", False, "show full tracebacks")


class _Fail(UserError):
  """A bad command line (exit status 2)."""


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
  from grood_jax.training.config import check_config

  if config.benchmark not in benchmark_names():
    raise DataError(f"unknown benchmark {config.benchmark!r} in config.benchmark; choose from "
                    f"{benchmark_names()}")
  if config.model.name not in model_names():
    raise ConfigError(f"unknown model {config.model.name!r} in config.model.name; choose from "
                      f"{model_names()}")
  check_config(config)      # sizes, learning rate > 0, seed range
  try:
    make_loss(config)
    create_optimizer(config, 100)
  except ValueError as e:
    raise ConfigError(f"bad config: {' '.join(str(e).split())}") from e
  _check_workdir(workdir)


def resolve_config_args(argv: list[str]) -> list[str]:
  """`--config NAME[:variant]` names a packaged config when NAME is not an existing file."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + configs.resolve(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = configs.resolve(out[i + 1])
  return out


def _quiet_libraries(debug: bool) -> None:
  """Noise of the libraries we call, not ours to report: ml_collections loads config files
  with importlib's deprecated `load_module()` (a DeprecationWarning shown under -W default),
  and orbax logs tracebacks through absl logging when a save fails (the failure itself
  reaches the user as one `error:` line). --debug keeps orbax's log."""
  warnings.filterwarnings("ignore", message=r"the load_module\(\) method is deprecated",
                          category=DeprecationWarning)
  if not debug:
    for name in ("absl", "orbax"):
      logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
  argv = resolve_config_args(sys.argv if argv is None else list(argv))
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    print(f"usage: grood-train --config NAME|FILE[:variant] --workdir DIR [flags]\n{__doc__}\n"
          f"packaged configs: {', '.join(configs.config_names())}\n\nflags:\n"
          f"{flags.FLAGS.main_module_help() or flags.FLAGS.module_help(__name__)}")
    return 0
  debug = "--debug" in argv
  return run_cli(lambda: _main(argv, debug), debug=debug,
                 interrupted="interrupted before training started; nothing to save")


def _main(argv: list[str], debug: bool) -> int:
  _quiet_libraries(debug)     # inside run_cli's catch_warnings: scoped to this command
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
    raise _Fail("--config is required (e.g. --config fashion_mnist_cnn:smoke, or a config file "
                f"path; packaged configs: {', '.join(configs.config_names())})")
  if not _WORKDIR.value:
    raise _Fail("--workdir is required")
  if _SEED.value is not None:
    config.seed = _SEED.value
  _preflight(config, _WORKDIR.value)

  from grood_jax import parallel
  if _DISTRIBUTED.value or any(v is not None for v in (_COORDINATOR.value, _NUM_PROCESSES.value,
                                                       _PROCESS_ID.value)):
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from grood_jax.training import train

  main_process = parallel.is_main_process()    # process 0 alone prints and shows progress
  summary = train(config, _WORKDIR.value, progress=_PROGRESS.value and main_process,
                  log=print if main_process else None,
                  allow_config_change=_ALLOW_CHANGE.value, tensorboard=_TENSORBOARD.value)
  if main_process:
    print("summary: " + json.dumps(summary))
  if summary["interrupted"]:
    print(f"interrupted: checkpoint saved at step {summary['step']}; rerun the same command to "
          "resume", file=sys.stderr)
    return 130
  return 0


def entry() -> None:
  """Console-script entry point (`grood-train`)."""
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  entry()
