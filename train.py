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

Rerunning with the same --workdir resumes from its newest checkpoint. Ctrl-C saves a
checkpoint and exits with status 130. Exit status 2: bad command line or config.
"""

from __future__ import annotations

import json
import re
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics.jsonl)")
_SEED = flags.DEFINE_integer("seed", None, "override config.seed")
_PROGRESS = flags.DEFINE_boolean("progress", True, "show a progress bar")
_DISTRIBUTED = flags.DEFINE_boolean("distributed", False, "jax.distributed.initialize() first")
_DEBUG = flags.DEFINE_boolean("debug", False, "show full tracebacks")


def _fail(msg: str, code: int = 2):
  print(f"train.py: error: {msg}", file=sys.stderr)
  sys.exit(code)


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


def main(argv: list[str]) -> int:
  debug = "--debug" in argv
  try:
    flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.get("seed")     # a config file that failed to load raises on first use
  except Exception as e:   # flags.Error, and anything the config file raises while loading
    if debug:
      raise
    _fail(_explain(e, argv))
  if config is None:
    _fail("--config is required (e.g. --config configs/fashion_mnist_cnn.py:smoke)")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  if _SEED.value is not None:
    config.seed = _SEED.value

  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from grood_jax.training import train

  try:
    summary = train(config, _WORKDIR.value, progress=_PROGRESS.value, log=print)
  except (ValueError, OSError) as e:   # DataError, CheckpointError, bad config values
    if debug:
      raise
    _fail(_one_line(e), code=1)
  print("summary: " + json.dumps(summary))
  return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
