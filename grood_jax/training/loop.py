"""`train(config, workdir)`: build, resume, train, evaluate, checkpoint.

Work directory: `checkpoints/` (see grood_jax.checkpoint), `metrics.jsonl` (one JSON line
per epoch), `tb/` (TensorBoard event files; see grood_jax.training.writers) and `.grood.lock`
(held by the training process: one writer per work directory). Rerunning `train` on a work directory resumes from its newest checkpoint (model,
optimizer, step, data-iterator position), and the result is bit-identical to an uninterrupted
run on the same device type. SIGINT (Ctrl-C) during training saves a checkpoint and returns
with `summary["interrupted"] = True`.

Losses with auxiliary outliers ("greg", "gregplus"; see grood_jax.training.losses) also get an
auxiliary loader over `data.load_auxiliary(config.aux.source, ...)` (refused if it overlaps an
evaluation set), seeded with config.seed + 1 and resumed from the checkpoint like the ID one.
Data-parallel over `config.devices` devices (0: every device, of every process after
`jax.distributed.initialize()`): the state is replicated, each global batch split over the
mesh (grood_jax.parallel); one device is the same code with a mesh of one.
`config.init_from` (a work directory) initialises the model from that run's newest checkpoint
(parameters and BatchNorm statistics) when the work directory holds no checkpoint yet; the
optimizer and schedule start fresh.

A resumed run must have the checkpoint's config, up to the fields in
`config.RESUME_HARMLESS` (logging / checkpoint cadence, evaluation batch size, data_dir,
devices, init_from); `allow_config_change=True` continues with the new values and records the
change in the checkpoints (`extra["config_history"]`). The epoch in progress keeps its running
sums in the checkpoints, so a resumed epoch's train_* means cover all of its steps. Training
stops with a ConfigError at the first non-finite loss (checked every `log_every_steps` steps
and before each checkpoint) and when the parameters are not finite at a checkpoint or an
epoch end: nothing non-finite is ever saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from typing import Callable

import jax
import numpy as np
from flax import nnx

from grood_jax import checkpoint
from grood_jax import data as data_lib
from grood_jax import parallel
from grood_jax.fileio import lock_dir
from grood_jax.models import build_model
from grood_jax.training import config as config_lib
from grood_jax.training import losses, writers
from grood_jax.training.train_state import (all_finite, create_optimizer, evaluate,
                                            learning_rate_schedule, make_train_step)


def _limit(images, labels, n):
  return (images, labels) if not n or n >= len(images) else (images[:n], labels[:n])


@contextlib.contextmanager
def _sigint_flag():
  """Yields a dict whose 'hit' turns True on SIGINT (main thread only; else never)."""
  flag = {"hit": False}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del signum, frame
    flag["hit"] = True

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGINT, previous)


class _Batches:
  """Exactly `steps` batches per epoch from a TrainLoader, whether it ends each epoch or not."""

  def __init__(self, loader):
    self.loader = loader
    self._it = iter(loader)

  def next(self):
    try:
      return next(self._it)
    except StopIteration:
      self._it = iter(self.loader)
      return next(self._it)


def training_mesh(config):
  """The data-parallel mesh of `config.devices` devices (0: all); ConfigError if the batch
  sizes do not split evenly over it."""
  from grood_jax.errors import ConfigError

  try:
    mesh = parallel.mesh_for(int(config.get("devices", 0)))
  except ValueError as e:
    raise ConfigError(f"config.devices={config.get('devices', 0)}: {e}") from None
  n_dev = mesh.size
  sizes = {"batch_size": int(config.batch_size),
           "auxiliary batch (config.aux)": losses.aux_loader_batch_size(config)}
  for what, size in sizes.items():
    if size % n_dev:
      raise ConfigError(f"{what}={size} does not split over {n_dev} devices; use a multiple of "
                        f"{n_dev} or set config.devices")
  return mesh


def init_model_from(model, path) -> int:
  """Copies the model state of the newest checkpoint in `path` into `model`; returns its step.

  CheckpointError when that model differs (architecture, classes, shapes).
  """
  src, _, step = checkpoint.load_model(path)
  src_state, dst_state = nnx.state(src), nnx.state(model)
  shapes = lambda t: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), t)
  if (type(src) is not type(model)
      or jax.tree.structure(src_state) != jax.tree.structure(dst_state)
      or shapes(src_state) != shapes(dst_state)):
    raise checkpoint.CheckpointError(
        f"init_from={path}: its model ({type(src).__name__}, {src.num_classes} classes) does not "
        f"match the configured one ({type(model).__name__}, {model.num_classes} classes)")
  nnx.update(model, src_state)
  return step



def _first_nonfinite(entries, first_step: int):
  """(step, value) of the first entry whose loss is not finite, or None."""
  for i, entry in enumerate(entries):
    v = float(entry["loss"])
    if not np.isfinite(v):
      return first_step + i, v
  return None


def _check_resume_config(stored, config, step, workdir, allow: bool) -> dict:
  """The config fields that differ from the checkpoint's; ConfigError when one changes the
  run and `allow` is False."""
  from grood_jax.errors import ConfigError
  changes = config_lib.config_changes(stored, checkpoint.jsonable(config.to_dict()))
  changing = config_lib.run_changes(changes)
  if changing and not allow:
    listed = ", ".join(f"{k} ({a!r} in the checkpoint, now {b!r})"
                       for k, (a, b) in changing.items())
    raise ConfigError(
        f"the config differs from the one of the checkpoint (step {step}) in {workdir}: "
        f"{listed}; rerun with the checkpoint's values, use another --workdir, or pass "
        "--allow-config-change (train(..., allow_config_change=True)) to continue this run "
        "with the new values")
  return changes


def train(config, workdir, *, progress: bool = True, log: Callable[[str], None] | None = None,
          stop_at_step: int | None = None, return_model: bool = False,
          allow_config_change: bool = False, tensorboard: bool = True) -> dict:
  """Trains `config` into `workdir` (resuming if it holds a checkpoint). Returns a summary.

  `log` receives one line per epoch (None: silent); with a progress bar, lines go through
  tqdm's external write mode so that they do not collide with the bar. `stop_at_step` ends the
  run early at that global step with a checkpoint, as a preemption would (a rerun continues
  from there). `return_model=True` adds the trained model (eval mode) under "model".
  `tensorboard=False`: no event files (metrics.jsonl is still written); see
  grood_jax.training.writers for what is logged where.
  Summary keys: test_accuracy, val_accuracy, train_seconds, total_seconds, step, epoch,
  steps_total, resumed_from, interrupted, workdir, run_id.

  Checks, in this order, before anything is written: the config values
  (`config.check_config`), the device split, the lock on an existing work directory, the data
  (e.g. a batch larger than the training set); only then is the work directory created.

  Raises (all `grood_jax.UserError`, one-line messages):
    ConfigError      bad config values; the config differs from the checkpoint's in a field
                     that changes the run (`config.RESUME_HARMLESS` may differ) and
                     `allow_config_change` is False; the run diverged (a non-finite loss, or
                     non-finite parameters at a checkpoint or an epoch end): nothing
                     non-finite is saved, the newest checkpoint holds finite parameters.
    LockError        another process holds `workdir` (grood_jax.fileio.lock_dir; process 0
                     holds it for the whole call).
    OutputError      a checkpoint could not be written (disk full, permissions).
    CheckpointError  the checkpoints in `workdir` cannot be resumed.
    DataError        the data cannot be used as configured.
  """
  config_lib.check_config(config)
  mesh = training_mesh(config)
  workdir = os.fspath(workdir)
  with contextlib.ExitStack() as stack:
    locked = False
    if writers.is_main_process() and os.path.isdir(workdir):
      stack.enter_context(lock_dir(workdir, "--workdir"))      # a second writer: at once
      locked = True
    return _train(config, workdir, mesh, stack, locked, progress=progress, log=log,
                  stop_at_step=stop_at_step, return_model=return_model,
                  allow_config_change=allow_config_change, tensorboard=tensorboard)


def _train(config, workdir, mesh, stack, locked, *, progress, log, stop_at_step, return_model,
           allow_config_change, tensorboard) -> dict:
  from grood_jax.errors import ConfigError, OutputError

  t_start = time.perf_counter()
  log = log or (lambda s: None)

  bench = data_lib.load_benchmark(config.benchmark, data_dir=config.data_dir, seed=config.seed)
  train_x, train_y = _limit(bench.id_train.images, bench.id_train.labels,
                            config.max_train_samples)
  val_x, val_y = _limit(bench.id_val.images, bench.id_val.labels, config.max_eval_samples)
  test_x, test_y = _limit(bench.id_test.images, bench.id_test.labels, config.max_eval_samples)

  loader = data_lib.TrainLoader(train_x, train_y, batch_size=config.batch_size,
                                seed=config.seed, mean=bench.mean, std=bench.std,
                                augment=config.augment)
  loss_fn = losses.make_loss(config)
  aux_loader = None
  if getattr(loss_fn, "aux_mode", None) is not None:
    aux_cfg = config.aux
    aux_set = data_lib.load_auxiliary(aux_cfg.source, bench, seed=config.seed,
                                      num_samples=aux_cfg.num_samples, data_dir=config.data_dir)
    aux_loader = data_lib.TrainLoader(
        aux_set.images, np.zeros(len(aux_set), np.int32),
        batch_size=losses.aux_loader_batch_size(config), seed=config.seed + 1,
        mean=bench.mean, std=bench.std, augment=False)
  spe = loader.steps_per_epoch           # full batches; the remainder is dropped
  steps_total = spe * config.num_epochs

  # Everything above only read; from here on the work directory exists and is ours.
  if writers.is_main_process() and not locked:
    stack.enter_context(lock_dir(workdir, "--workdir"))        # creates the directory
  os.makedirs(workdir, exist_ok=True)

  model = build_model(config.model.name, num_classes=bench.num_classes,
                      in_channels=bench.image_shape[-1], seed=config.seed,
                      **dict(config.model.kwargs))
  model.train()
  optimizer = nnx.Optimizer(model, create_optimizer(config, steps_total), wrt=nnx.Param)

  step, resumed_from, extra = 0, None, {}
  config_history: list = []
  newest = checkpoint.latest_step(workdir)
  if newest is not None:
    try:                      # the config first: a changed model would fail the restore
      stored = checkpoint.load_config(workdir, newest).to_dict()
    except checkpoint.CheckpointError:
      stored = None           # unreadable newest step: restore_training falls back
    if stored is not None:
      _check_resume_config(stored, config, newest, workdir, allow_config_change)
    step, extra = checkpoint.restore_training(workdir, model, optimizer)
    model.train()
    if step != newest or stored is None:
      stored = checkpoint.load_config(workdir, step).to_dict()
    changes = _check_resume_config(stored, config, step, workdir, allow_config_change)
    loader.set_state(extra["loader"])
    if aux_loader is not None:
      aux_loader.set_state(extra["aux_loader"])
    resumed_from = step
    config_history = list(extra.get("config_history") or [])
    if changes:
      config_history.append({"step": step, "changes": {k: list(v) for k, v in changes.items()}})
    log(f"resumed from step {step} in {workdir}")
    if changes:
      log("config changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                  for k, (a, b) in changes.items()))
  elif config.get("init_from"):
    init_step = init_model_from(model, config.init_from)
    model.train()
    log(f"initialised the model from {config.init_from} (step {init_step})")

  run_id = extra.get("run_id") or uuid.uuid4().hex[:12]
  writers.prepare_metrics(workdir, run_id, resumed_from)
  train_log = stack.enter_context(contextlib.closing(writers.TrainLog(
      workdir, run_id, purge_step=(resumed_from or 0) + 1, tensorboard=tensorboard)))
  # The learning rate of every step, once (one small jitted call, not one per step).
  lrs = np.asarray(jax.jit(learning_rate_schedule(config, steps_total))(
      np.arange(max(1, steps_total))))

  # Running sums of the epoch in progress, kept in the checkpoints so that a resumed epoch's
  # train_* means cover all of its steps.
  acc_state = {"epoch": None, "sums": {}, "n": 0, "seconds": 0.0, "from_step": None}
  if resumed_from is not None and extra.get("epoch_sums") is not None:
    acc_state.update(epoch=extra.get("sums_epoch"), sums=dict(extra["epoch_sums"]),
                     n=int(extra.get("epoch_steps", 0)),
                     seconds=float(extra.get("epoch_seconds", 0.0)))
  last_saved = [newest if resumed_from is None else step]

  def diverged(what: str, at_step: int):
    saved = (f"the newest checkpoint (step {last_saved[0]}) holds the last finite parameters"
             if last_saved[0] is not None else "no checkpoint was saved")
    return ConfigError(
        f"training diverged: {what} at step {at_step} (epoch {(at_step - 1) // spe + 1}); "
        f"stopped, {saved}. Lower config.learning_rate (now {config.learning_rate}) and rerun "
        "in a new --workdir (or with --allow-config-change to continue from that checkpoint)")

  def check_state_finite(at_step: int):
    jax.block_until_ready(state)
    if not all_finite(state):
      raise diverged("the parameters hold NaN/Inf values", at_step)

  def save(at_step, epoch):
    sync_model()
    saved_extra = {"loader": loader.get_state(), "epoch": epoch, "run_id": run_id,
                   "sums_epoch": acc_state["epoch"], "epoch_sums": dict(acc_state["sums"]),
                   "epoch_steps": acc_state["n"], "epoch_seconds": acc_state["seconds"]
                   + (time.perf_counter() - acc_state["t0"] if "t0" in acc_state else 0.0),
                   "config_history": config_history}
    if aux_loader is not None:
      saved_extra["aux_loader"] = aux_loader.get_state()
    try:
      checkpoint.save(workdir, at_step, model, optimizer, config, saved_extra)
    except (checkpoint.CheckpointError, OutputError) as e:
      newest_now = checkpoint.latest_step(workdir)
      where = (f"the newest complete checkpoint is step {newest_now}" if newest_now is not None
               else "no checkpoint is complete")
      raise type(e)(f"{e}; {where}: fix that and rerun the same command to resume") from e
    last_saved[0] = at_step
    train_log.flush()

  graphdef, state = nnx.split((model, optimizer))
  state = parallel.replicate(state, mesh)
  train_step = make_train_step(graphdef, loss_fn, select_fn=losses.make_aux_selector(config),
                               seed=config.seed, return_metrics=True, return_grad_norm=True,
                               mesh=mesh)
  batches = _Batches(loader)
  aux_batches = _Batches(aux_loader) if aux_loader is not None else None

  def sync_model():
    nnx.update((model, optimizer), state)

  progress_bar = None
  if progress:
    from tqdm.auto import tqdm
    progress_bar = tqdm(total=steps_total, initial=step, unit="step", dynamic_ncols=True,
                        desc="train")
    stack.callback(progress_bar.close)

  def say(line: str):
    if progress_bar is not None:
      with progress_bar.external_write_mode():
        log(line)
    else:
      log(line)

  def end_epoch(epoch: int, at_step: int) -> dict:
    """Evaluates, writes the epoch's metrics.jsonl line and TensorBoard scalars."""
    nonlocal val_acc, test_acc
    sync_model()
    val_acc = evaluate(model, val_x, val_y, mean=bench.mean, std=bench.std,
                       batch_size=config.eval_batch_size)
    model.train()
    n = acc_state["n"]
    record = {"epoch": epoch + 1, "step": at_step,
              **{f"train_{k}": v / max(1, n) for k, v in sorted(acc_state["sums"].items())},
              "val_accuracy": val_acc,
              "epoch_seconds": round(acc_state["seconds"] + time.perf_counter()
                                     - acc_state.get("t0", time.perf_counter()), 3)}
    if n != spe:
      record["train_steps"] = n           # a resumed epoch whose earlier sums were not saved
    if at_step >= steps_total:
      test_acc = evaluate(model, test_x, test_y, mean=bench.mean, std=bench.std,
                          batch_size=config.eval_batch_size)
      model.train()
      record["test_accuracy"] = test_acc
    train_log.epoch(record)
    say(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in record.items()))
    return record

  train_seconds, interrupted = 0.0, False
  val_acc = test_acc = float("nan")

  # Killed after the checkpoint at an epoch's last step but before that epoch's line: write it.
  if (resumed_from is not None and step % spe == 0 and step > 0
      and acc_state["epoch"] == step // spe - 1 and step not in writers.logged_steps(workdir)):
    acc_state["t0"] = time.perf_counter()
    end_epoch(step // spe - 1, step)

  with _sigint_flag() as sigint:
    while step < steps_total:
      epoch = step // spe
      if acc_state["epoch"] != epoch:       # a new epoch (not the resumed one's sums)
        acc_state.update(epoch=epoch, sums={}, n=0, seconds=0.0)
      acc_state["t0"] = time.perf_counter()
      t_epoch = t_window = time.perf_counter()
      pending = []

      def flush(pending):
        nonlocal t_window
        vals = jax.device_get(pending)                             # one host sync
        first = step - len(vals) + 1
        now = time.perf_counter()
        train_log.steps(first, vals, lrs[first - 1:step])
        train_log.scalar("train/step_seconds", (now - t_window) / len(vals), step)
        t_window = now
        bad = _first_nonfinite(vals, first)
        if bad is not None:
          train_log.flush()
          raise diverged(f"the loss is {bad[1]}", bad[0])
        for entry in vals:
          for k, v in entry.items():
            if k != "grad_norm":
              acc_state["sums"][k] = acc_state["sums"].get(k, 0.0) + float(v)
        acc_state["n"] += len(vals)
        return vals[-1]

      while step < (epoch + 1) * spe:
        x, y = batches.next()
        aux = () if aux_batches is None else (aux_batches.next()[0],)
        state, loss, acc, metrics, grad_norm = train_step(state, x, y, *aux)
        pending.append({"loss": loss, "accuracy": acc, **metrics, "grad_norm": grad_norm})
        step += 1
        stop = sigint["hit"] or (stop_at_step is not None and step >= stop_at_step)
        ckpt = step % config.checkpoint_every_steps == 0 or stop
        if len(pending) >= config.log_every_steps or step % spe == 0 or ckpt:
          last_vals = flush(pending)
          if progress_bar is not None:
            progress_bar.update(len(pending))
            progress_bar.set_postfix(epoch=epoch + 1, loss=f"{float(last_vals['loss']):.4f}",
                                     acc=f"{acc_state['sums']['accuracy'] / acc_state['n']:.4f}")
          pending = []
        if ckpt:
          check_state_finite(step)
          train_seconds += time.perf_counter() - t_epoch
          save(step, epoch)
          t_epoch = time.perf_counter()
        if stop:
          interrupted = sigint["hit"]
          break
      jax.block_until_ready(state)
      train_seconds += time.perf_counter() - t_epoch
      if interrupted or step % spe != 0:   # SIGINT, or stop_at_step mid-epoch
        break

      check_state_finite(step)
      end_epoch(epoch, step)
      if step >= steps_total and checkpoint.latest_step(workdir) != step:
        save(step, epoch + 1)
      if stop_at_step is not None and step >= stop_at_step:
        break

  if step >= steps_total and np.isnan(test_acc):
    # Finished earlier (rerun of a completed work directory): report the final model.
    sync_model()
    val_acc = evaluate(model, val_x, val_y, mean=bench.mean, std=bench.std,
                       batch_size=config.eval_batch_size)
    test_acc = evaluate(model, test_x, test_y, mean=bench.mean, std=bench.std,
                        batch_size=config.eval_batch_size)
  sync_model()
  model.eval()
  summary = {
      "test_accuracy": test_acc, "val_accuracy": val_acc,
      "train_seconds": round(train_seconds, 3),
      "total_seconds": round(time.perf_counter() - t_start, 3),
      "step": step, "epoch": step / spe, "steps_total": steps_total,
      "resumed_from": resumed_from, "interrupted": interrupted, "workdir": workdir,
      "run_id": run_id,
  }
  if return_model:
    summary["model"] = model
  return summary
