"""Training reliability (issue 13, training side): divergence stops the run with the last finite
checkpoint kept, values and data sizes refused before the work directory exists, one writer per
work directory, resume refuses a changed config, tampered checkpoint metadata is a one-line
CheckpointError, resumed epochs average the whole epoch, foreign metrics.jsonl is set aside,
and a full disk is one `error:` line.

In-process on the tiny synthetic benchmark of tests/test_training.py (seconds); the command line
is called in-process too (`grood_jax.cli.train.main`, flags reset before each call).
"""

import errno
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from grood_jax import checkpoint
from grood_jax.errors import CheckpointError, ConfigError, DataError, LockError, OutputError
from grood_jax.fileio import lock_dir
from grood_jax.training import losses, train
from grood_jax.training import loop as loop_lib

from test_training import _synthetic_benchmark, _tiny_config

CONFIG_FILE = '''
import ml_collections
from grood_jax.training.config import base_config


def get_config(arg=None):
  c = base_config()
  c.benchmark = "synthetic"
  c.model.kwargs = ml_collections.ConfigDict({"width": 4, "feature_dim": 8})
  c.batch_size = 32
  c.num_epochs = 1
  c.learning_rate = 1e-2
  c.warmup_epochs = 0.2
  c.checkpoint_every_steps = 4
  c.eval_batch_size = 64
  c.log_every_steps = 5
  c.lock()
  return c
'''


@pytest.fixture
def synthetic(monkeypatch):
  from grood_jax.data import benchmarks
  monkeypatch.setattr(loop_lib.data_lib, "load_benchmark", _synthetic_benchmark)
  monkeypatch.setitem(benchmarks._REGISTRY, "synthetic", _synthetic_benchmark)


@pytest.fixture
def cli(tmp_path, capfd, synthetic, monkeypatch):
  """cli(*args) -> (exit status, stdout, stderr) of `train.py --config <tiny> *args`
  (ml_collections reads the --config.FIELD overrides from sys.argv, so it is set too)."""
  from grood_jax.cli import train as train_cli
  cfg = tmp_path / "tiny_config.py"
  cfg.write_text(CONFIG_FILE)

  def run(*args):
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)               # the previous call's override flags
    flags.FLAGS.unparse_flags()
    capfd.readouterr()
    argv = ["train.py", "--config", str(cfg), "--noprogress", *map(str, args)]
    monkeypatch.setattr(sys, "argv", argv)
    rc = train_cli.main(argv)
    out, err = capfd.readouterr()
    return rc, out, err
  return run


def _one_error_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  return lines[0]


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- divergence


def test_diverged_loss_stops_and_keeps_the_last_finite_checkpoint(synthetic, tmp_path):
  config = _tiny_config(learning_rate=1e6, checkpoint_every_steps=1, log_every_steps=1)
  with pytest.raises(ConfigError, match=r"training diverged: .* at step (\d+)") as info:
    train(config, tmp_path, progress=False)
  msg = str(info.value)
  bad_step = int(msg.split(" at step ")[1].split()[0])
  newest = checkpoint.latest_step(tmp_path)
  assert newest is not None and newest < bad_step
  assert f"newest checkpoint (step {newest})" in msg and "\n" not in msg
  model, _, step = checkpoint.load_model(tmp_path)
  assert step == newest
  assert all(np.isfinite(a).all() for a in _leaves(nnx.state(model)))
  lines = open(tmp_path / "metrics.jsonl").read().splitlines() if (
      tmp_path / "metrics.jsonl").exists() else []
  assert all(json.loads(l)["step"] < bad_step for l in lines)


def _nan_loss(config):
  """Cross-entropy + 0 * log(0): a NaN loss from the first step on."""
  ce = losses.make_loss(_tiny_config())

  def loss_fn(model, x, y):
    loss, logits = ce(model, x, y)
    return loss + 0.0 * jnp.log(0.0 * loss), logits
  return loss_fn


def test_a_non_finite_loss_stops_the_run_before_any_save(synthetic, tmp_path, monkeypatch):
  """The per-step loss check (not the later parameter check at a checkpoint or epoch end)
  stops the run, before any checkpoint or metrics line."""
  monkeypatch.setitem(losses._LOSSES, "nan_loss", _nan_loss)
  config = _tiny_config(loss="nan_loss", checkpoint_every_steps=100, log_every_steps=1)
  with pytest.raises(ConfigError, match=r"training diverged: the loss is nan at step 1 "
                                        r".*no checkpoint was saved"):
    train(config, tmp_path, progress=False)
  assert checkpoint.latest_step(tmp_path) is None
  assert not (tmp_path / "metrics.jsonl").exists()


def _nan_grad_loss(config):
  """Cross-entropy plus 0 * sum(sqrt|w|) of the head kernel: a finite loss whose gradient
  is NaN at w = 0 (0 * inf), so the parameters turn NaN while the loss stays finite."""
  ce = losses.make_loss(_tiny_config())

  def loss_fn(model, x, y):
    loss, logits = ce(model, x, y)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    w = leaves[0]
    return loss + 0.0 * jnp.sum(jnp.sqrt(jnp.abs(w * 0.0))), logits
  return loss_fn


def test_non_finite_parameters_are_never_saved(synthetic, tmp_path, monkeypatch):
  monkeypatch.setitem(losses._LOSSES, "nan_grad", _nan_grad_loss)
  config = _tiny_config(loss="nan_grad", checkpoint_every_steps=1, log_every_steps=100)
  with pytest.raises(ConfigError, match=r"parameters hold NaN/Inf values at step 1 .*"
                                        r"no checkpoint was saved"):
    train(config, tmp_path, progress=False)
  assert checkpoint.latest_step(tmp_path) is None


def test_diverged_run_exits_nonzero_with_one_line(cli, tmp_path):
  rc, out, err = cli("--workdir", tmp_path / "w", "--config.learning_rate=1e6",
                     "--config.checkpoint_every_steps=1", "--config.log_every_steps=1")
  assert rc == 2 and "summary:" not in out
  assert "training diverged" in _one_error_line(err)


# ----------------------------------------------------------------------------- preflight


@pytest.mark.parametrize("args, match", [
    (["--seed", "-1"], "seed -1: must be an integer"),
    (["--config.learning_rate=-0.01"], "learning_rate=-0.01: must be a finite number > 0"),
    (["--config.learning_rate=0"], "learning_rate=0"),
    (["--config.learning_rate=nan"], "learning_rate=nan"),
    (["--config.batch_size=100000"], "only 320 training images for batch_size 100000"),
    (["--config.max_train_samples=5"], "only 5 training images for batch_size 32"),
])
def test_bad_values_are_refused_before_the_workdir_exists(cli, tmp_path, args, match):
  work = tmp_path / "work"
  rc, out, err = cli("--workdir", work, *args)
  assert rc == 2 and match in _one_error_line(err)
  assert not work.exists()


def test_library_refuses_bad_values_before_writing(synthetic, tmp_path):
  with pytest.raises(ConfigError, match="seed -1"):
    train(_tiny_config(seed=-1), tmp_path / "a", progress=False)
  with pytest.raises(DataError, match="only 5 training images"):
    train(_tiny_config(max_train_samples=5), tmp_path / "b", progress=False)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_at_once(cli, synthetic, tmp_path, monkeypatch):
  work = tmp_path / "w"
  loads = []

  def load(*a, **k):
    loads.append(a)
    return _synthetic_benchmark(*a, **k)
  monkeypatch.setattr(loop_lib.data_lib, "load_benchmark", load)
  with lock_dir(work, "--workdir"):                 # another train holds it
    rc, out, err = cli("--workdir", work)
    assert not loads                                # refused before any work
    line = _one_error_line(err)
    assert rc == 2 and f"in use by PID {os.getpid()}" in line and "--workdir" in line
    assert not (work / "checkpoints").exists()
    with pytest.raises(LockError):
      train(_tiny_config(), work, progress=False)
  # released: the same command now runs
  rc, out, err = cli("--workdir", work)
  assert rc == 0, err


# ----------------------------------------------------------------------------- resume config


def test_resume_with_a_changed_config_is_refused_unless_allowed(synthetic, tmp_path):
  config = _tiny_config()
  train(config, tmp_path, progress=False, stop_at_step=13)
  stored = checkpoint.load_config(tmp_path).to_dict()
  changed = _tiny_config(learning_rate=0.5, num_epochs=3)
  with pytest.raises(ConfigError, match=r"learning_rate \(0\.01 in the checkpoint, now 0\.5\)"
                                        r".*num_epochs \(2 in the checkpoint, now 3\)"):
    train(changed, tmp_path, progress=False)
  assert checkpoint.latest_step(tmp_path) == 13
  assert checkpoint.load_config(tmp_path).to_dict() == stored     # not rewritten
  # harmless fields may differ
  harmless = _tiny_config(log_every_steps=3, checkpoint_every_steps=5, eval_batch_size=32)
  out = train(harmless, tmp_path, progress=False, stop_at_step=15)
  assert out["resumed_from"] == 13
  # allowed: runs on, and the checkpoints record the change
  out = train(changed, tmp_path, progress=False, allow_config_change=True)
  assert out["resumed_from"] == 15 and out["steps_total"] == 30
  model = loop_lib.build_model("cnn", 4, 1, width=4, feature_dim=8)
  _, extra = checkpoint.restore_training(tmp_path, model)
  changes = [c["changes"] for c in extra["config_history"]]
  assert "learning_rate" in changes[-1] and "log_every_steps" in changes[0]
  assert checkpoint.load_config(tmp_path).learning_rate == 0.5


def test_cli_resume_config_check(cli, tmp_path):
  work = tmp_path / "w"
  assert cli("--workdir", work, "--config.num_epochs=2")[0] == 0
  rc, _, err = cli("--workdir", work, "--config.num_epochs=3", "--config.learning_rate=0.5")
  line = _one_error_line(err)
  assert rc == 2 and "learning_rate" in line and "num_epochs" in line
  assert "--allow-config-change" in line
  rc, out, err = cli("--workdir", work, "--config.num_epochs=3", "--allow-config-change")
  assert rc == 0, err
  assert '"step": 30' in out and "config changed on resume: num_epochs 2 -> 3" in out


# ----------------------------------------------------------------------------- tampered meta


def _item_file(step_dir, item):
  path = os.path.join(step_dir, item, "metadata")       # orbax's JSON item file
  assert os.path.isfile(path), os.listdir(os.path.join(step_dir, item))
  return path


@pytest.mark.parametrize("item, tamper, match", [
    ("config", lambda d: list(d.items()), "'config' is a JSON list"),
    ("meta", lambda d: {**d, "model": {k: v for k, v in d["model"].items()
                                       if k != "num_classes"}}, "model.num_classes"),
    ("meta", lambda d: {**d, "model": "cnn"}, "no model description"),
    ("meta", lambda d: [d], "bad 'meta'"),
    ("extra", lambda d: [1, 2], "'extra' is a JSON list"),
])
def test_tampered_metadata_is_a_checkpoint_error(tmp_path, item, tamper, match):
  config = _tiny_config()
  model = loop_lib.build_model("cnn", 4, 1, width=4, feature_dim=8)
  checkpoint.save(tmp_path, 1, model, None, config, {"loader": {}})
  path = _item_file(tmp_path / "checkpoints" / "1", item)
  with open(path) as f:
    data = json.load(f)
  with open(path, "w") as f:
    json.dump(tamper(data), f)
  readers = [lambda: checkpoint.restore_training(tmp_path, model)] if item == "extra" else [
      lambda: checkpoint.load_model(tmp_path), lambda: checkpoint.load_config(tmp_path)]
  for read in readers:
    with pytest.raises(CheckpointError, match="not a grood_jax checkpoint or is unreadable") as e:
      read()
    assert match in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- metrics.jsonl


def test_resumed_epoch_averages_cover_the_whole_epoch(synthetic, tmp_path):
  config = _tiny_config()
  train(config, tmp_path / "a", progress=False)
  train(config, tmp_path / "b", progress=False, stop_at_step=13)
  train(config, tmp_path / "b", progress=False, stop_at_step=17)
  train(config, tmp_path / "b", progress=False)
  read = lambda d: [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")]
  a, b = read("a"), read("b")
  assert [r["step"] for r in b] == [10, 20]
  strip = lambda r: {k: v for k, v in r.items() if k not in ("epoch_seconds", "run_id")}
  assert [strip(r) for r in a] == [strip(r) for r in b]          # equal, not just close
  assert len({r["run_id"] for r in b}) == 1


def test_epoch_line_written_after_a_kill_between_checkpoint_and_line(synthetic, tmp_path):
  config = _tiny_config()
  train(config, tmp_path / "a", progress=False)
  train(config, tmp_path / "b", progress=False, stop_at_step=10)   # checkpoint at step 10
  path = tmp_path / "b" / "metrics.jsonl"
  path.write_text("")                                  # as if killed before its line
  train(config, tmp_path / "b", progress=False)
  read = lambda p: [json.loads(l) for l in open(p)]
  strip = lambda r: {k: v for k, v in r.items() if k not in ("epoch_seconds", "run_id")}
  assert [strip(r) for r in read(path)] == [strip(r) for r in read(tmp_path / "a" /
                                                                    "metrics.jsonl")]


def test_a_foreign_metrics_file_is_moved_aside(synthetic, tmp_path):
  config = _tiny_config(num_epochs=1)
  foreign = '{"epoch": 1, "step": 3, "train_loss": 9.0}\n'
  (tmp_path / "fresh").mkdir()
  (tmp_path / "fresh" / "metrics.jsonl").write_text(foreign)
  with pytest.warns(UserWarning, match="was not written by this run"):
    train(config, tmp_path / "fresh", progress=False)
  assert (tmp_path / "fresh" / "metrics.jsonl.foreign").read_text() == foreign
  lines = (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1 and json.loads(lines[0])["train_loss"] != 9.0
  # a resumed run whose metrics.jsonl was replaced by another run's
  config2 = _tiny_config()
  train(config2, tmp_path / "r", progress=False, stop_at_step=13)
  other = json.dumps({"epoch": 1, "step": 10, "train_loss": 9.0, "run_id": "someoneelse"})
  (tmp_path / "r" / "metrics.jsonl").write_text(other + "\n")
  with pytest.warns(UserWarning, match="someoneelse"):
    train(config2, tmp_path / "r", progress=False)
  assert (tmp_path / "r" / "metrics.jsonl.foreign").read_text() == other + "\n"
  lines = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [20] and lines[0]["run_id"] != "someoneelse"


# ----------------------------------------------------------------------------- full disk


def _full_disk_after(monkeypatch, n_ok: int):
  """orbax's file writes (etils epath write_text, used for its metadata and JSON items) fail
  with ENOSPC after `n_ok` successful ones; the failure then passes through orbax's own
  error handling and logging as a real full disk would."""
  from etils.epath import gpath
  original = gpath._GPath.write_text
  calls = {"n": 0}

  def write_text(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] > n_ok:
      raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return original(self, *args, **kwargs)
  monkeypatch.setattr(gpath._GPath, "write_text", write_text)


def test_full_disk_is_one_error_line(cli, tmp_path, monkeypatch):
  work = tmp_path / "w"
  saves = []
  real_save = checkpoint.save

  def counting_save(*a, **k):
    saves.append(a[1])
    if len(saves) == 2:                    # the second checkpoint hits a full disk
      _full_disk_after(monkeypatch, 0)
    return real_save(*a, **k)
  monkeypatch.setattr(loop_lib.checkpoint, "save", counting_save)
  rc, out, err = cli("--workdir", work)
  line = _one_error_line(err)
  assert rc == 2 and "no space left on device" in line
  assert "could not save step 8" in line and "newest complete checkpoint is step 4" in line
  assert checkpoint.latest_step(work) == 4


def test_full_disk_in_the_library_is_an_output_error(tmp_path, monkeypatch):
  model = loop_lib.build_model("cnn", 4, 1, width=4, feature_dim=8)
  _full_disk_after(monkeypatch, 0)
  with pytest.raises(OutputError, match="no space left on device"):
    checkpoint.save(tmp_path, 1, model, None, _tiny_config(), {})


# ----------------------------------------------------------------------------- warnings


def test_load_module_deprecation_is_not_shown(cli, tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("always")               # as `python -W default train.py`
    rc, out, err = cli("--workdir", tmp_path / "w", "--config.learning_rate=0")
  assert rc == 2 and "load_module" not in err
  _one_error_line(err)
