"""Shared defaults of every training config (configs/*.py start from `base_config()`).

Config files are loaded by path (ml_collections `config_flags`), so the shared part lives in
the library rather than next to them.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field `train()` reads, with defaults. Unlocked: files set theirs, then lock."""
  c = ml_collections.ConfigDict()
  c.benchmark = "fashion_mnist"
  c.data_dir = ml_collections.config_dict.placeholder(str)   # None: the usual data roots
  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"
  c.model.kwargs = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128                # global batch, split over the devices
  c.devices = 0                     # data-parallel over this many devices; 0: all of them
  c.num_epochs = 5
  c.optimizer = "adamw"             # "adamw" | "sgd" (momentum, nesterov)
  c.learning_rate = 3e-3            # peak of the warmup-cosine schedule
  c.momentum = 0.9                  # sgd only
  c.weight_decay = 5e-4             # decoupled for adamw, L2-like for sgd; kernels only
  c.warmup_epochs = 0.5
  c.augment = False
  c.loss = "ce"                     # see grood_jax.training.losses
  c.label_smoothing = 0.0
  c.checkpoint_every_steps = 1000
  c.eval_batch_size = 500
  c.max_train_samples = 0           # > 0: use only the first N training images (smoke runs)
  c.max_eval_samples = 0            # > 0: evaluate on the first N images of each split
  c.log_every_steps = 20            # progress-bar refresh (a host sync)
  # Fine-tuning: a train.py work directory whose newest checkpoint gives the initial model
  # (parameters and BatchNorm statistics; the optimizer starts fresh). Ignored on resume.
  c.init_from = ml_collections.config_dict.placeholder(str)
  # Auxiliary outliers (losses "greg" / "gregplus"); see grood_jax.data.auxiliary.
  c.aux = ml_collections.ConfigDict()
  c.aux.source = "photos"           # a named auxiliary set, npz:PATH or folder:DIR
  c.aux.num_samples = 20000         # size of a generated auxiliary set
  c.aux.batch_size = 0              # aux images per step; 0: the ID batch size
  c.aux.pool_factor = 6             # gregplus: candidate pool = pool_factor x aux batch
  c.aux.clusters = 32               # gregplus: k-means clusters (<= aux batch)
  c.aux.kmeans_iters = 20           # gregplus: Lloyd iterations
  # GReg loss (METHOD.md §2): CE + lam_s * L_S + lam_grad * L_grad.
  c.greg = ml_collections.ConfigDict()
  c.greg.m_in = -25.0
  c.greg.m_out = -7.0
  c.greg.lam_s = 0.1
  c.greg.lam_grad = 1.0
  c.greg.input_grad = "sum"         # "sum" (train-mode BN, as the energies) | "eval"
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A variant that runs end to end in seconds on CPU (tests, `:smoke`)."""
  c.num_epochs = 1
  c.max_train_samples = 2048
  c.max_eval_samples = 1000
  c.checkpoint_every_steps = 8
  c.warmup_epochs = 0.1
  return c


def small_cnn_config(benchmark: str) -> ml_collections.ConfigDict:
  """`base_config()` with the SmallCNN every Fashion-MNIST config starts from (unlocked)."""
  c = base_config()
  c.benchmark = benchmark
  c.model.name = "cnn"
  c.model.kwargs.width = 16
  c.model.kwargs.feature_dim = 128
  c.batch_size = 128                # global batch, split over the devices
  c.devices = 0                     # data-parallel over this many devices; 0: all of them
  c.optimizer = "adamw"
  c.weight_decay = 5e-4
  return c


def finish(c: ml_collections.ConfigDict, arg, smoke_fn=None) -> ml_collections.ConfigDict:
  """Applies the `:smoke` variant (`smoke`, then `smoke_fn` if given) and locks the config."""
  if arg == "smoke":
    smoke(c)
    if smoke_fn is not None:
      smoke_fn(c)
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
  c.lock()
  return c


# ----------------------------------------------------------------------------- validation

MAX_SEED = 2**31 - 2          # config.seed + 1 seeds the auxiliary loader; both fit int32


def check_config(config) -> None:
  """ConfigError for a value that cannot train: sizes < 1, a learning rate that is not a
  finite number > 0, a seed outside [0, 2**31 - 2], a negative sample limit. Reads nothing
  but the config (no data, no files)."""
  import math
  from grood_jax.errors import ConfigError

  for field in ("batch_size", "num_epochs", "checkpoint_every_steps", "eval_batch_size",
                "log_every_steps"):
    if int(config[field]) < 1:
      raise ConfigError(f"config.{field}={config[field]}: must be at least 1")
  for field in ("max_train_samples", "max_eval_samples"):
    if int(config[field]) < 0:
      raise ConfigError(f"config.{field}={config[field]}: must be 0 (all) or positive")
  lr = config.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ConfigError(f"config.learning_rate={lr}: must be a finite number > 0 (the peak of "
                      "the warmup-cosine schedule)")
  seed = config.seed
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
    raise ConfigError(f"seed {seed}: must be an integer in [0, {MAX_SEED}] (--seed or "
                      "config.seed)")
  for field in ("weight_decay", "warmup_epochs"):
    v = config.get(field)
    if v is not None and not (math.isfinite(v) and v >= 0):
      raise ConfigError(f"config.{field}={v}: must be a finite number >= 0")


# Fields a resumed run may change freely: they change how often the run logs, reports
# progress or checkpoints, how large its evaluation batches are, where it finds the same
# data, how many devices share each (global) batch, and what a fresh run starts from
# (init_from is ignored on resume). They do not change the parameters (devices: up to float
# summation order, as any device count does). Every other field changes the run.
RESUME_HARMLESS = ("log_every_steps", "checkpoint_every_steps", "eval_batch_size", "data_dir",
                   "devices", "init_from")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


_ABSENT = "<absent>"


def config_changes(stored: dict, current: dict) -> dict[str, tuple]:
  """{dotted field: (stored value, current value)} for every field that differs between two
  `config.to_dict()` trees (JSON-comparable: tuples and lists compare equal)."""
  import json
  norm = lambda d: _flat(json.loads(json.dumps(d, default=str)))
  a, b = norm(stored), norm(current)
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def run_changes(changes: dict[str, tuple]) -> dict[str, tuple]:
  """The entries of `config_changes` that change the run (not in RESUME_HARMLESS)."""
  return {k: v for k, v in changes.items() if k not in RESUME_HARMLESS}
