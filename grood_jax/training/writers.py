"""What a training run writes besides checkpoints: `metrics.jsonl` and TensorBoard event files.

Both are written by process 0 only (`jax.process_index() == 0`); the other processes of a
multi-host run get a writer that does nothing.

  <workdir>/metrics.jsonl   one JSON line per epoch (epoch, step, train_* means over the whole
                            epoch, val_accuracy, epoch_seconds, test_accuracy on the last one,
                            run_id)
  <workdir>/tb/             TensorBoard event files (tensorboardX; TensorFlow is not needed):
                              per step     train/loss, train/accuracy, train/learning_rate,
                                           train/grad_norm, train/<loss term> (GReg: ce, l_s,
                                           l_grad, s_in, s_aux, frac_in, frac_aux)
                              per window   train/step_seconds (mean wall time per step over the
                                           last log_every_steps steps; the first window
                                           includes compilation)
                              per epoch    epoch/train_loss, epoch/train_accuracy,
                                           epoch/train_<term>, epoch/val_accuracy,
                                           epoch/test_accuracy (last epoch), epoch/epoch_seconds

Steps are global optimizer steps counted from 1 (the checkpoint and metrics.jsonl `step`):
the value at step s is the one of the s-th update; `train/learning_rate` at s is the schedule's
rate that update used (`schedule(s - 1)`). A resumed run opens the event files with
`purge_step` = the restored step + 1, so TensorBoard drops the events a killed run wrote past
its last checkpoint and the curves have no repeats.

Every line of metrics.jsonl carries the run's id (`run_id`, kept in the checkpoints): a
metrics.jsonl that is not this run's (another id, or written when the work directory held no
checkpoint of this run) is never appended to; it is moved aside to `metrics.jsonl.foreign[-N]`
with a warning.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import jax

METRICS = "metrics.jsonl"
TB_DIR = "tb"


def is_main_process() -> bool:
  return jax.process_index() == 0


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    return f.read().splitlines()


def _run_id_of(line: str):
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record.get("run_id") if isinstance(record, dict) else None


def _move_aside(path: str, why: str) -> str:
  dst = path + ".foreign"
  n = 1
  while os.path.exists(dst):
    n += 1
    dst = f"{path}.foreign-{n}"
  os.rename(path, dst)
  warnings.warn(f"{path} {why}; moved it to {os.path.basename(dst)} and starting a new one",
                stacklevel=3)
  return dst


def prepare_metrics(workdir: str, run_id: str, restored_step: int | None) -> None:
  """Makes `<workdir>/metrics.jsonl` this run's before anything is appended to it.

  `restored_step` None (a fresh run): an existing file is foreign (moved aside). A resumed
  run: a file holding a line of another run id (or none) is foreign; the lines of epochs
  that end after `restored_step` are dropped (a run killed after it logged an epoch but
  before that epoch's checkpoint redoes the epoch and logs it again).
  """
  from grood_jax.fileio import atomic_write_text
  path = os.path.join(workdir, METRICS)
  if not is_main_process() or not os.path.exists(path):
    return
  lines = [l for l in _read_lines(path) if l.strip()]
  if restored_step is None:
    if lines:
      _move_aside(path, "was not written by this run (the work directory holds no "
                  "checkpoint of it)")
    else:
      os.unlink(path)
    return
  ids = {_run_id_of(l) for l in lines}
  if ids - {run_id}:
    other = sorted(str(i) for i in ids - {run_id})
    _move_aside(path, f"was not written by this run (run id {run_id}; the file holds "
                f"{', '.join(other)})")
    return
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) > restored_step:
        continue
    except (ValueError, KeyError, TypeError):
      pass                                  # keep what we cannot read
    keep.append(line)
  if len(keep) != len(lines):
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def logged_steps(workdir: str) -> set[int]:
  """The `step` of every readable metrics.jsonl line."""
  path = os.path.join(workdir, METRICS)
  out = set()
  if os.path.exists(path):
    for line in _read_lines(path):
      try:
        out.add(int(json.loads(line)["step"]))
      except (ValueError, KeyError, TypeError):
        pass
  return out


class TrainLog:
  """metrics.jsonl + TensorBoard scalars of one training run (no-ops off process 0).

    log = TrainLog(workdir, run_id, purge_step=restored_step + 1)   # or None: a fresh run
    log.steps(first_step, [{"loss": .., "accuracy": .., "grad_norm": ..}, ...], lrs)
    log.scalar("train/step_seconds", value, step)
    log.epoch(record)          # one metrics.jsonl line and the epoch/ scalars
    log.close()
  """

  def __init__(self, workdir: str, run_id: str, *, purge_step: int | None = None,
               tensorboard: bool = True):
    self.workdir = workdir
    self.run_id = run_id
    self.active = is_main_process()
    self._writer = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter
      # tensorboardX names event files by the second; the suffix keeps two writers of one
      # second (a quick resume) apart and in order (TensorBoard reads files by name).
      self._writer = SummaryWriter(logdir=os.path.join(workdir, TB_DIR), purge_step=purge_step,
                                   flush_secs=30, filename_suffix=f".{time.time_ns():020d}")

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, METRICS)

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._writer is not None:
      self._writer.add_scalar(tag, float(value), global_step=int(step))

  def steps(self, first_step: int, entries: list[dict], learning_rates) -> None:
    """Per-step scalars of steps first_step, first_step + 1, ... (one entry per step)."""
    if self._writer is None:
      return
    for i, entry in enumerate(entries):
      s = first_step + i
      for k, v in entry.items():
        self._writer.add_scalar(f"train/{k}", float(v), global_step=s)
      self._writer.add_scalar("train/learning_rate", float(learning_rates[i]), global_step=s)

  def epoch(self, record: dict) -> None:
    """Appends `record` (+ run_id) to metrics.jsonl and writes its numbers as epoch/ scalars."""
    if not self.active:
      return
    line = json.dumps({**record, "run_id": self.run_id})
    with open(self.metrics_path, "a") as f:
      f.write(line + "\n")
    if self._writer is not None:
      step = int(record["step"])
      for k, v in record.items():
        if k not in ("epoch", "step") and isinstance(v, (int, float)):
          self._writer.add_scalar(f"epoch/{k}", float(v), global_step=step)
      self._writer.flush()

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
