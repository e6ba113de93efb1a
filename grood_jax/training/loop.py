"""`train(config, workdir)`: build, resume, train, evaluate, checkpoint.

Work directory: `checkpoints/` (see grood_jax.checkpoint) and `metrics.jsonl` (one JSON line
per epoch). Rerunning `train` on a work directory resumes from its newest checkpoint (model,
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
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from grood_jax import checkpoint
from grood_jax import data as data_lib
from grood_jax import parallel
from grood_jax.models import build_model
from grood_jax.training import losses
from grood_jax.training.train_state import create_optimizer, evaluate, make_train_step


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


def _drop_metrics_after(path: str, step: int) -> None:
  """Removes the metrics.jsonl lines of epochs that end after `step` (a run killed after it
  logged an epoch but before that epoch's checkpoint redoes the epoch and logs it again)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().splitlines()
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) > step:
        continue
    except (ValueError, KeyError, TypeError):
      pass                                  # keep what we cannot read
    keep.append(line)
  if len(keep) != len(lines):
    from grood_jax.fileio import atomic_write_text
    atomic_write_text(path, "".join(l + "\n" for l in keep))


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


def train(config, workdir, *, progress: bool = True, log: Callable[[str], None] | None = None,
          stop_at_step: int | None = None, return_model: bool = False) -> dict:
  """Trains `config` into `workdir` (resuming if it holds a checkpoint). Returns a summary.

  `log` receives one line per epoch (None: silent). `stop_at_step` ends the run early at that
  global step with a checkpoint, as a preemption would (a rerun continues from there).
  `return_model=True` adds the trained model (eval mode) under "model".
  Summary keys: test_accuracy, val_accuracy, train_seconds, total_seconds, step, epoch,
  steps_total, resumed_from, interrupted, workdir.
  """
  t_start = time.perf_counter()
  log = log or (lambda s: None)
  workdir = os.fspath(workdir)
  mesh = training_mesh(config)
  os.makedirs(workdir, exist_ok=True)

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

  model = build_model(config.model.name, num_classes=bench.num_classes,
                      in_channels=bench.image_shape[-1], seed=config.seed,
                      **dict(config.model.kwargs))
  model.train()
  optimizer = nnx.Optimizer(model, create_optimizer(config, steps_total), wrt=nnx.Param)

  step, resumed_from = 0, None
  if checkpoint.latest_step(workdir) is not None:
    step, extra = checkpoint.restore_training(workdir, model, optimizer)
    model.train()
    loader.set_state(extra["loader"])
    if aux_loader is not None:
      aux_loader.set_state(extra["aux_loader"])
    resumed_from = step
    _drop_metrics_after(os.path.join(workdir, "metrics.jsonl"), step)
    log(f"resumed from step {step} in {workdir}")
  elif config.get("init_from"):
    init_step = init_model_from(model, config.init_from)
    model.train()
    log(f"initialised the model from {config.init_from} (step {init_step})")

  def save(at_step, epoch):
    extra = {"loader": loader.get_state(), "epoch": epoch}
    if aux_loader is not None:
      extra["aux_loader"] = aux_loader.get_state()
    checkpoint.save(workdir, at_step, model, optimizer, config, extra)

  graphdef, state = nnx.split((model, optimizer))
  state = parallel.replicate(state, mesh)
  train_step = make_train_step(graphdef, loss_fn, select_fn=losses.make_aux_selector(config),
                               seed=config.seed, return_metrics=True, mesh=mesh)
  batches = _Batches(loader)
  aux_batches = _Batches(aux_loader) if aux_loader is not None else None

  def sync_model():
    nnx.update((model, optimizer), state)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  train_seconds, interrupted = 0.0, False
  val_acc = test_acc = float("nan")
  progress_bar = None
  if progress:
    from tqdm.auto import tqdm
    progress_bar = tqdm(total=steps_total, initial=step, unit="step", dynamic_ncols=True,
                        desc="train")

  with _sigint_flag() as sigint:
    while step < steps_total:
      epoch = step // spe
      t_epoch = t_epoch_start = time.perf_counter()
      sums: dict[str, float] = {}
      n_steps = 0
      pending = []

      def flush(pending):
        vals = jax.device_get(pending)                             # one host sync
        for entry in vals:
          for k, v in entry.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        return vals[-1]

      while step < (epoch + 1) * spe:
        x, y = batches.next()
        aux = () if aux_batches is None else (aux_batches.next()[0],)
        state, loss, acc, metrics = train_step(state, x, y, *aux)
        pending.append({"loss": loss, "accuracy": acc, **metrics})
        step += 1
        n_steps += 1
        if len(pending) >= config.log_every_steps or step % spe == 0:
          last_vals = flush(pending)
          if progress_bar is not None:
            progress_bar.update(len(pending))
            progress_bar.set_postfix(epoch=epoch + 1, loss=f"{float(last_vals['loss']):.4f}",
                                     acc=f"{sums['accuracy'] / n_steps:.4f}")
          pending = []
        stop = sigint["hit"] or (stop_at_step is not None and step >= stop_at_step)
        if step % config.checkpoint_every_steps == 0 or stop:
          jax.block_until_ready(state)
          train_seconds += time.perf_counter() - t_epoch
          sync_model()
          save(step, epoch)
          t_epoch = time.perf_counter()
        if stop:
          interrupted = sigint["hit"]
          break
      if pending:
        flush(pending)
        if progress_bar is not None:
          progress_bar.update(len(pending))
      jax.block_until_ready(state)
      train_seconds += time.perf_counter() - t_epoch
      if interrupted or step % spe != 0:   # SIGINT, or stop_at_step mid-epoch
        break

      sync_model()
      val_acc = evaluate(model, val_x, val_y, mean=bench.mean, std=bench.std,
                         batch_size=config.eval_batch_size)
      model.train()
      record = {"epoch": epoch + 1, "step": step,
                **{f"train_{k}": v / max(1, n_steps) for k, v in sums.items()},
                "val_accuracy": val_acc,
                "epoch_seconds": round(time.perf_counter() - t_epoch_start, 3)}
      last = step >= steps_total
      if last:
        test_acc = evaluate(model, test_x, test_y, mean=bench.mean, std=bench.std,
                            batch_size=config.eval_batch_size)
        model.train()
        record["test_accuracy"] = test_acc
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in record.items()))
      if last:
        save(step, epoch + 1)
      if stop_at_step is not None and step >= stop_at_step:
        break

  if progress_bar is not None:
    progress_bar.close()
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
  }
  if return_model:
    summary["model"] = model
  return summary
