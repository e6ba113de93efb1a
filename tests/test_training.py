"""Training: step, loop, checkpoints, resume, determinism, configs (CPU, tiny data)."""

import glob
import json
import os
import subprocess
import sys
import warnings

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from grood_jax import checkpoint
from grood_jax.data.base import Benchmark, ImageSet
from grood_jax.models import build_model
from grood_jax.training import base_config, losses, train
from grood_jax.training import loop as loop_lib
from grood_jax.training.train_state import create_optimizer, evaluate, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic_benchmark(name="synthetic", *, data_dir=None, seed=0):
  """4 classes of bright squares in different quadrants, plus noise; deterministic."""
  del name, data_dir
  rng = np.random.default_rng(seed)

  def make(n, tag):
    y = rng.integers(0, 4, n).astype(np.int32)
    x = rng.integers(0, 60, (n, 28, 28, 1))
    for c in range(4):
      r, q = divmod(c, 2)
      x[y == c, 14 * r:14 * r + 14, 14 * q:14 * q + 14] += 150
    return ImageSet(tag, x.clip(0, 255).astype(np.uint8), y)

  return Benchmark("synthetic", 4, ["a", "b", "c", "d"], (28, 28, 1), 0.3, 0.3,
                   make(320, "train"), make(64, "val"), make(64, "test"), [])


@pytest.fixture
def synthetic(monkeypatch):
  monkeypatch.setattr(loop_lib.data_lib, "load_benchmark", _synthetic_benchmark)


def _tiny_config(**kw):
  c = base_config()
  c.benchmark = "synthetic"
  c.model.kwargs = ml_collections.ConfigDict({"width": 4, "feature_dim": 8})
  c.batch_size = 32            # 10 steps per epoch
  c.num_epochs = 2
  c.learning_rate = 1e-2
  c.warmup_epochs = 0.2
  c.checkpoint_every_steps = 4
  c.eval_batch_size = 64
  c.log_every_steps = 5
  c.update(kw)
  c.lock()
  return c


def _params(model):
  return jax.tree.leaves(nnx.state(model))


def _assert_same(a, b):
  la, lb = _params(a), _params(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_train_step_decreases_loss():
  config = _tiny_config()
  bench = _synthetic_benchmark()
  model = build_model("cnn", 4, 1, seed=0, width=4, feature_dim=8)
  model.train()
  opt = nnx.Optimizer(model, create_optimizer(config, 50), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  step = make_train_step(graphdef, losses.make_loss(config))
  x = ((bench.id_train.images[:32] / 255.0 - 0.3) / 0.3).astype(np.float32)
  y = bench.id_train.labels[:32]
  first = None
  for _ in range(20):
    state, loss, acc = step(state, x, y)
    first = float(loss) if first is None else first
  assert float(loss) < 0.7 * first
  assert 0.0 <= float(acc) <= 1.0


def test_cross_entropy_matches_optax():
  logits = jax.random.normal(jax.random.key(0), (5, 3))
  y = np.array([0, 2, 1, 1, 0])
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  np.testing.assert_allclose(losses.cross_entropy(logits, y), ref, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown loss"):
    losses.make_loss(ml_collections.ConfigDict({"loss": "nope"}))


def test_resume_determinism_and_load_model(synthetic, tmp_path):
  config = _tiny_config()
  straight = train(config, tmp_path / "a", progress=False, return_model=True)
  assert straight["step"] == 20 and not straight["interrupted"]
  assert checkpoint.latest_step(tmp_path / "a") == 20
  lines = open(tmp_path / "a" / "metrics.jsonl").read().splitlines()
  assert len(lines) == 2 and "test_accuracy" in lines[-1]
  # Same seed -> bit-identical parameters.
  again = train(config, tmp_path / "b", progress=False, return_model=True)
  _assert_same(straight["model"], again["model"])
  assert again["test_accuracy"] == straight["test_accuracy"]
  # Pre-empted mid-epoch (step 13), then rerun -> the same parameters.
  part = train(config, tmp_path / "c", progress=False, stop_at_step=13)
  assert part["step"] == 13 and checkpoint.latest_step(tmp_path / "c") == 13
  # as if killed after logging epoch 2 but before its checkpoint: the resumed run redoes
  # epoch 2 and logs it once
  with open(tmp_path / "c" / "metrics.jsonl", "a") as f:      # the line that run would write
    f.write(json.dumps({"epoch": 2, "step": 20, "train_loss": 123.0,
                        "run_id": part["run_id"]}) + "\n")
  rest = train(config, tmp_path / "c", progress=False, return_model=True)
  assert rest["resumed_from"] == 13
  _assert_same(straight["model"], rest["model"])
  epochs = [json.loads(l) for l in open(tmp_path / "c" / "metrics.jsonl")]
  assert [e["epoch"] for e in epochs] == [1, 2] and epochs[1]["train_loss"] != 123.0
  # load_model rebuilds from the saved config: same parameters, same logits.
  loaded, cfg, step = checkpoint.load_model(tmp_path / "a")
  assert step == 20 and cfg.model.kwargs.width == 4 and cfg.num_epochs == 2
  _assert_same(straight["model"], loaded)
  x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(straight["model"](x)), np.asarray(loaded(x)))
  bench = _synthetic_benchmark()
  acc = evaluate(loaded, bench.id_test.images, bench.id_test.labels, mean=0.3, std=0.3,
                 batch_size=64)
  assert acc == straight["test_accuracy"]


def test_corrupt_checkpoint_falls_back_or_errors(synthetic, tmp_path):
  config = _tiny_config(num_epochs=1)            # checkpoints at steps 4, 8, 10
  train(config, tmp_path, progress=False)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints"))
  assert steps == [4, 8, 10]
  for f in glob.glob(str(tmp_path / "checkpoints" / "10" / "model" / "**" / "*"), recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 0:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  with pytest.warns(UserWarning, match=r"step 10 .*falling back to step 8"):
    model, _, step = checkpoint.load_model(tmp_path)
  assert step == 8
  with pytest.warns(UserWarning, match="falling back to step 8"):
    step, extra = checkpoint.restore_training(tmp_path, model, None)
  assert step == 8 and "loader" in extra
  # restore_training set the unreadable newer step aside so that training rewrites it
  assert (tmp_path / "checkpoints" / "10.unreadable").exists()
  assert not (tmp_path / "checkpoints" / "10").exists()
  # Every step damaged -> one CheckpointError.
  for s in (4, 8):
    for f in glob.glob(str(tmp_path / "checkpoints" / str(s) / "meta" / "*")):
      open(f, "w").write("{not json")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(checkpoint.CheckpointError, match="none of the 2"):
      checkpoint.load_model(tmp_path)


def test_checkpoint_errors(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_model(tmp_path / "missing")
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
    checkpoint.load_model(tmp_path)
  os.makedirs(tmp_path / "7" / "model")
  with pytest.raises(checkpoint.CheckpointError, match="not a grood_jax checkpoint"):
    checkpoint.load_model(tmp_path)
  assert issubclass(checkpoint.CheckpointError, ValueError)


def test_relative_workdir_roundtrip(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _tiny_config()
  model = build_model("cnn", 4, 1, seed=1, width=4, feature_dim=8)
  assert checkpoint.save("wd", 3, model, None, config, {"k": np.int64(2)})
  assert not checkpoint.save("wd", 3, model, None, config, {})     # step exists
  loaded, cfg, step = checkpoint.load_model("wd")
  assert step == 3 and cfg.model.kwargs.feature_dim == 8
  _assert_same(model, loaded)


def _load_config_file(name, arg=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("name", ["fashion_mnist_cnn.py", "fashion_mnist_6v4_cnn.py"])
def test_configs_locked(name):
  c = _load_config_file(name)
  s = _load_config_file(name, "smoke")
  assert s.num_epochs == 1 and s.max_train_samples > 0 and c.max_train_samples == 0
  assert c.loss == "ce" and c.data_dir is None
  with pytest.raises(AttributeError):
    c.foo = 1
  with pytest.raises(TypeError):
    c.num_epochs = "three"


def test_cli_rejects_unknown_override(tmp_path):
  out = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/fashion_mnist_cnn.py:smoke",
       "--workdir", str(tmp_path), "--config.foo=1"],
      cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  assert "unknown config field 'foo'" in out.stderr and "Traceback" not in out.stderr


def test_smoke_config_end_to_end(tmp_path):
  """The real `:smoke` config on Fashion-MNIST (skipped when the data is absent)."""
  from grood_jax import data
  config = _load_config_file("fashion_mnist_6v4_cnn.py", "smoke")
  try:
    data.load_fashion_mnist(config.data_dir, download=False)
  except data.DataError:
    pytest.skip("Fashion-MNIST not available offline")
  summary = train(config, tmp_path, progress=False)
  assert summary["step"] == config.max_train_samples // config.batch_size
  assert checkpoint.latest_step(tmp_path) == summary["step"]
  assert summary["test_accuracy"] > 0.4
  model, cfg, _ = checkpoint.load_model(tmp_path)
  assert model.num_classes == 6 and cfg.benchmark == "fashion_mnist_6v4"
