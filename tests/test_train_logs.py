"""Training logs (issue 14, training side): TensorBoard event files in <workdir>/tb, read back
with TensorBoard's own reader (EventAccumulator, no TensorFlow), hold the loss, accuracy and
grad norm of every step as the loop computed them, the optax schedule's learning rate, and the
epoch values of metrics.jsonl; a resumed run's curves have no repeats; only process 0 writes;
log lines do not collide with the progress bar.

In-process on the tiny synthetic benchmark of tests/test_training.py (20 steps, seconds).
"""

import io
import json
import re
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grood_jax import checkpoint, data as data_lib
from grood_jax.models import build_model
from grood_jax.training import losses, train, writers
from grood_jax.training import loop as loop_lib
from grood_jax.training.train_state import learning_rate_schedule

from test_training import _synthetic_benchmark, _tiny_config


@pytest.fixture
def synthetic(monkeypatch):
  monkeypatch.setattr(loop_lib.data_lib, "load_benchmark", _synthetic_benchmark)


def _events(workdir):
  ea = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
  ea.Reload()
  return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.fixture
def recorded(monkeypatch):
  """The (loss, accuracy, grad_norm) of every step, as the jitted step returned them."""
  out = []
  real = loop_lib.make_train_step

  def make(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def wrapped(*a):
      result = step_fn(*a)
      out.append((result[1], result[2], result[-1]))
      return result
    return wrapped
  monkeypatch.setattr(loop_lib, "make_train_step", make)
  return out


def test_event_files_hold_the_loop_values(synthetic, recorded, tmp_path):
  config = _tiny_config()                        # 2 epochs x 10 steps, log every 5
  train(config, tmp_path, progress=False)
  ev = _events(tmp_path)
  loss = np.float32([float(l) for l, _, _ in recorded])
  acc = np.float32([float(a) for _, a, _ in recorded])
  gnorm = np.float32([float(g) for _, _, g in recorded])
  assert len(loss) == 20
  for tag, want in [("train/loss", loss), ("train/accuracy", acc), ("train/grad_norm", gnorm)]:
    steps, values = zip(*ev[tag])
    assert list(steps) == list(range(1, 21)), tag
    np.testing.assert_array_equal(np.float32(values), want, err_msg=tag)   # float32: exact
  # learning rate: the optax schedule at the count each update used (step - 1)
  schedule = learning_rate_schedule(config, 20)
  steps, lrs = zip(*ev["train/learning_rate"])
  assert list(steps) == list(range(1, 21))
  want = np.float32([float(schedule(s - 1)) for s in steps])
  np.testing.assert_allclose(np.float32(lrs), want, rtol=1e-6, atol=1e-9)
  assert lrs[0] == 0.0 and max(lrs) == pytest.approx(config.learning_rate)
  # epoch scalars are metrics.jsonl's numbers; the epoch loss is the mean of the step losses
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  for key in ("train_loss", "train_accuracy", "val_accuracy"):
    assert [s for s, _ in ev[f"epoch/{key}"]] == [10, 20]
    np.testing.assert_array_equal(np.float32([v for _, v in ev[f"epoch/{key}"]]),
                                  np.float32([r[key] for r in records]))
  assert ev["epoch/test_accuracy"] == [(20, pytest.approx(records[-1]["test_accuracy"]))]
  np.testing.assert_allclose(records[0]["train_loss"], loss[:10].astype(np.float64).mean(),
                             rtol=1e-6)
  # step time: one value per host sync, at its last step: every 5 steps, each checkpoint
  # (every 4) and each epoch end (10, 20)
  assert [s for s, _ in ev["train/step_seconds"]] == [4, 8, 10, 12, 16, 20]
  assert all(np.isfinite(v) and v > 0 for _, v in ev["train/step_seconds"])


def test_grad_norm_is_the_norm_of_the_first_step_gradient(synthetic, recorded, tmp_path):
  """Recomputed outside the loop: the same model, the loader's first batch, jax.grad."""
  config = _tiny_config(num_epochs=1)
  train(config, tmp_path, progress=False, tensorboard=False)
  bench = _synthetic_benchmark()
  loader = data_lib.TrainLoader(bench.id_train.images, bench.id_train.labels,
                                batch_size=config.batch_size, seed=config.seed,
                                mean=bench.mean, std=bench.std)
  x, y = next(iter(loader))
  model = build_model("cnn", 4, 1, seed=config.seed, width=4, feature_dim=8)
  model.train()
  loss_fn = losses.make_loss(config)
  (loss, _), grads = nnx.value_and_grad(lambda m: loss_fn(m, x, y), has_aux=True)(model)
  assert float(recorded[0][0]) == pytest.approx(float(loss), rel=1e-6)
  assert float(recorded[0][2]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
  assert not (tmp_path / "tb").exists()           # tensorboard=False


def test_resumed_curves_have_no_repeats(synthetic, tmp_path):
  config = _tiny_config()
  train(config, tmp_path / "a", progress=False)
  train(config, tmp_path / "b", progress=False, stop_at_step=13)
  # as if killed after logging step 13 but before its checkpoint: resume from step 12
  import shutil
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "13")
  assert checkpoint.latest_step(tmp_path / "b") == 12
  out = train(config, tmp_path / "b", progress=False)
  assert out["resumed_from"] == 12
  a, b = _events(tmp_path / "a"), _events(tmp_path / "b")
  for tag in ("train/loss", "train/grad_norm", "train/learning_rate", "epoch/train_loss",
              "epoch/val_accuracy"):
    steps = [s for s, _ in b[tag]]
    assert steps == sorted(set(steps)), tag                 # monotone, each step once
    assert b[tag] == a[tag], tag                            # the uninterrupted run's curve


def test_only_process_zero_writes_logs(synthetic, tmp_path, monkeypatch):
  monkeypatch.setattr(writers, "is_main_process", lambda: False)
  out = train(_tiny_config(num_epochs=1), tmp_path, progress=False)
  assert out["step"] == 10 and checkpoint.latest_step(tmp_path) == 10
  assert not (tmp_path / "tb").exists() and not (tmp_path / "metrics.jsonl").exists()
  assert not (tmp_path / ".grood.lock").exists()


def test_log_lines_do_not_collide_with_the_progress_bar(synthetic, tmp_path, monkeypatch):
  """stdout and stderr on one stream, as in a terminal: each epoch line starts on a cleared
  line (tqdm's external write mode), not glued onto the bar."""
  tty = io.StringIO()
  monkeypatch.setattr(sys, "stdout", tty)
  monkeypatch.setattr(sys, "stderr", tty)
  train(_tiny_config(), tmp_path, progress=True, log=print)
  text = tty.getvalue()
  assert "train:" in text                              # the bar was drawn
  starts = [m.start() for m in re.finditer(r"epoch=\d+ step=", text)]
  assert len(starts) == 2
  for i in starts:
    assert text[i - 1] in "\r\n", repr(text[max(0, i - 40):i + 10])
