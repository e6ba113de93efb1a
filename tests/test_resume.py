"""Crash-safe, resumable training: train.py killed (SIGKILL), interrupted (SIGINT) and resumed
from damaged checkpoints gives the same final parameters, bit for bit, as one uninterrupted run.

The real `configs/fashion_mnist_6v4_cnn.py:smoke` in subprocesses (skipped when the
Fashion-MNIST data is absent): 16 steps, a checkpoint every 4.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from grood_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
EVERY = 4
ARGS = ["--config", os.path.join(ROOT, "configs", "fashion_mnist_6v4_cnn.py") + ":smoke",
        f"--config.checkpoint_every_steps={EVERY}", "--config.max_train_samples=2048",
        "--config.max_eval_samples=100", "--noprogress"]


def _fashion_mnist_present() -> bool:
  from grood_jax import data
  try:
    data.load_fashion_mnist(None, download=False)
  except data.DataError:
    return False
  return True


pytestmark = pytest.mark.skipif(not _fashion_mnist_present(),
                                reason="Fashion-MNIST is not available offline")


def _start(workdir, *extra) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *ARGS,
                           f"--workdir={workdir}", *extra],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
  out, err = p.communicate()        # no wall-clock limit: the run ends after its fixed steps
  return p.returncode, out, err


def _wait_for_step(p: subprocess.Popen, workdir, min_step: int) -> None:
  """Polls until a finalised checkpoint step >= min_step exists, or fails once the process has
  ended without one. No wall-clock deadline (a loaded machine is only slower): the training
  run has a fixed number of steps, so one of the two always happens."""
  root = os.path.join(workdir, "checkpoints")
  while True:
    if os.path.isdir(root) and any(d.isdigit() and int(d) >= min_step for d in os.listdir(root)):
      return
    if p.poll() is not None:
      if os.path.isdir(root) and any(d.isdigit() and int(d) >= min_step
                                     for d in os.listdir(root)):
        return
      _, err = p.communicate()
      pytest.fail(f"train.py ended (status {p.returncode}) before step {min_step}:\n{err}")
    time.sleep(0.01)


def _params(workdir):
  model, _, step = checkpoint.load_model(workdir)
  return step, jax.tree.leaves(nnx.state(model))


def _assert_bit_identical(workdir, reference):
  step, leaves = _params(workdir)
  ref_step, ref_leaves = reference
  assert step == ref_step == STEPS
  assert len(leaves) == len(ref_leaves)
  for a, b in zip(leaves, ref_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _truncate_model_file(step_dir):
  """Cuts the largest file of the step's 'model' item in half (a torn write)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "model", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as fh:
    fh.truncate(os.path.getsize(biggest) // 2)
  return biggest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run; started at once so that it overlaps the first test's runs."""
  workdir = tmp_path_factory.mktemp("reference")
  p = _start(workdir)
  state = {}

  def get():
    if "params" not in state:
      rc, _, err = _finish(p)
      assert rc == 0, err
      state["params"] = _params(workdir)
    return state["params"]

  yield get
  if p.poll() is None:
    p.kill()
    p.wait()


def test_kill_interrupt_truncate_resume_is_bit_identical(tmp_path, reference):
  """One work directory through every mishap (one chain keeps the file fast):
  SIGKILL mid-run (with a save left half-written) -> resume, then SIGINT -> clean exit with a
  checkpoint, then the newest step torn on disk -> fallback with a warning -> resume to the
  end: the final parameters equal the uninterrupted run's, bit for bit."""
  workdir = tmp_path / "run"
  root = os.path.join(workdir, "checkpoints")

  # 1. SIGKILL after the first checkpoint.
  p = _start(workdir)
  _wait_for_step(p, workdir, EVERY)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  killed = _steps(workdir)
  assert killed and killed[-1] < STEPS - EVERY, f"the run was not killed early: steps {killed}"
  # What a kill during a save leaves: the next step half-written in orbax's temporary
  # directory (renamed to `<step>/` only once complete).
  tmp = os.path.join(root, f"{killed[-1] + EVERY}.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(root, str(killed[-1])), tmp)
  _truncate_model_file(tmp)
  assert checkpoint.latest_step(workdir) == killed[-1]      # never taken for a step

  # 2. Resume; SIGINT once it has saved a newer step: a checkpoint, status 130, no traceback.
  p = _start(workdir)
  _wait_for_step(p, workdir, killed[-1] + EVERY)
  p.send_signal(signal.SIGINT)
  rc, out, err = _finish(p)
  assert rc == 130, err
  assert f"resumed from step {killed[-1]}" in out
  assert "falling back" not in err                          # the last complete step was used
  assert '"interrupted": true' in out and "Traceback" not in err
  assert "interrupted: checkpoint saved at step" in err
  steps = _steps(workdir)
  latest = steps[-1]
  assert f'"step": {latest}' in out and killed[-1] < latest < STEPS
  assert not glob.glob(os.path.join(root, "*orbax-checkpoint-tmp*"))   # cleaned up

  # 3. The newest step torn on disk: the rerun warns, falls back to the previous step, sets
  # the damaged one aside (so that it is written again) and runs to the end.
  _truncate_model_file(os.path.join(root, str(latest)))
  rc, out, err = _finish(_start(workdir))
  assert rc == 0, err
  assert "warning:" in err and f"step {latest}" in err and f"falling back to step {steps[-2]}" in err
  assert f'"resumed_from": {steps[-2]}' in out
  assert os.path.isdir(os.path.join(root, f"{latest}.unreadable"))
  _assert_bit_identical(workdir, reference())
