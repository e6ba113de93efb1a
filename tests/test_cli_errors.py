"""Bad input to score.py / train.py: one line `error: ...` on stderr, exit status 2, nothing
written; internal failures exit 1; the same checkpoint and seed give byte-identical results.

score.py runs in-process (`score.main(argv)`) on a tiny synthetic benchmark registered here and
a tiny random SmallCNN checkpoint; train.py runs in subprocesses (its flags are global).
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from grood_jax import checkpoint
from grood_jax.data import base as data_base
from grood_jax.data import benchmarks
from grood_jax.data.sources import LUMA_WEIGHTS, load_folder, load_source
from grood_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import score  # noqa: E402

BENCH = "tiny_synth_cli"
N_CLASSES = 6


def _tiny_benchmark(*, data_dir=None, seed=0, val_fraction=None):
  del data_dir, val_fraction
  rng = np.random.default_rng(seed)

  def make(n, name, labelled=True):
    y = rng.integers(0, N_CLASSES, n).astype(np.int32)
    x = rng.integers(0, 80, (n, 28, 28, 1))
    for c in range(N_CLASSES):
      x[y == c, 4 * c:4 * c + 4] += 150
    return data_base.ImageSet(name, x.clip(0, 255).astype(np.uint8), y if labelled else None)

  return data_base.Benchmark(
      name=BENCH, num_classes=N_CLASSES, class_names=[str(c) for c in range(N_CLASSES)],
      image_shape=(28, 28, 1), mean=0.3, std=0.3,
      id_train=make(64, "train"), id_val=make(32, "val"), id_test=make(32, "test"),
      ood=[data_base.OODSet("blobs", "near", make(24, "blobs", labelled=False))],
      ood_val=make(24, "ood_val", labelled=False), noise=make(16, "noise", labelled=False))


if BENCH not in benchmarks.benchmark_names():
  benchmarks.register_benchmark(BENCH, _tiny_benchmark)


def _config():
  spec = importlib.util.spec_from_file_location(
      "cfg6v4", os.path.join(ROOT, "configs", "fashion_mnist_6v4_cnn.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("smoke")
  c.unlock()
  c.benchmark = BENCH
  c.model.kwargs = ml_collections.ConfigDict({"width": 4, "feature_dim": 8})
  return c


def _save(workdir, steps=(1, 2), nan=False):
  c = _config()
  model = build_model("cnn", num_classes=N_CLASSES, in_channels=1, seed=0, width=4,
                      feature_dim=8)
  if nan:
    from flax import nnx
    state = nnx.state(model, nnx.Param)
    leaves, tree = __import__("jax").tree.flatten(state)
    leaves[0] = leaves[0].at[0].set(np.nan)
    nnx.update(model, __import__("jax").tree.unflatten(tree, leaves))
  for s in steps:
    checkpoint.save(workdir, s, model, None, c)
  return str(workdir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny random SmallCNN checkpoint (6 classes) with two steps."""
  return _save(tmp_path_factory.mktemp("ckpt"))


def _truncate(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "model", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as fh:
    fh.truncate(os.path.getsize(biggest) // 2)


def _score(capsys, *argv):
  rc = score.main([str(a) for a in argv])
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


def _assert_user_error(capsys, argv, out_dir, match, code=2):
  """Exit status 2, exactly one stderr line `error: ...` containing `match`, no --out."""
  before = _snapshot(out_dir)
  rc, _, err = _score(capsys, *argv, "--out", out_dir)
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == code, err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert match in lines[0], lines[0]
  assert "Traceback" not in err
  assert _snapshot(out_dir) == before, "the output directory was created or modified"
  return lines[0]


def _snapshot(path):
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    return ("file", open(path, "rb").read())
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                for d, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- checkpoints


def test_ckpt_missing(capsys, tmp_path):
  _assert_user_error(capsys, ["--ckpt", tmp_path / "nope"], tmp_path / "out", "no such directory")


def test_ckpt_is_a_file(capsys, tmp_path):
  (tmp_path / "f").write_text("x")
  _assert_user_error(capsys, ["--ckpt", tmp_path / "f"], tmp_path / "out", "not a directory")


def test_ckpt_empty_dir(capsys, tmp_path):
  (tmp_path / "empty").mkdir()
  _assert_user_error(capsys, ["--ckpt", tmp_path / "empty"], tmp_path / "out", "no checkpoint")


def test_ckpt_dir_of_something_else(capsys, tmp_path):
  other = tmp_path / "other"
  (other / "photos").mkdir(parents=True)
  (other / "notes.txt").write_text("hello")
  _assert_user_error(capsys, ["--ckpt", other], tmp_path / "out", "no checkpoint")
  (other / "checkpoints" / "5" / "model").mkdir(parents=True)
  _assert_user_error(capsys, ["--ckpt", other], tmp_path / "out", "not a grood_jax checkpoint")


def test_ckpt_truncated_single_step(capsys, tmp_path):
  work = _save(tmp_path / "one", steps=(3,))
  _truncate(os.path.join(work, "checkpoints", "3"))
  _assert_user_error(capsys, ["--ckpt", work], tmp_path / "out", "step 3")


def test_ckpt_nan_parameters(capsys, tmp_path):
  work = _save(tmp_path / "nan", steps=(1,), nan=True)
  _assert_user_error(capsys, ["--ckpt", work], tmp_path / "out", "NaN/Inf")


def test_ckpt_truncated_latest_falls_back_with_warning(capsys, tmp_path, ckpt):
  work = tmp_path / "two"
  shutil.copytree(ckpt, work)
  _truncate(os.path.join(work, "checkpoints", "2"))
  rc, _, err = _score(capsys, "--ckpt", work, "--detectors", "msp", "--no-plots",
                      "--out", tmp_path / "out")
  assert rc == 0, err
  warn = [line for line in err.splitlines() if line.startswith("warning: ")]
  assert len(warn) == 1 and "step 2" in warn[0] and "falling back to step 1" in warn[0], err
  assert '"checkpoint_step": 1' in (tmp_path / "out" / "results.json").read_text()
  assert os.path.isdir(os.path.join(work, "checkpoints", "2"))   # scoring never moves files


def test_checkpoint_of_another_benchmark(capsys, tmp_path, ckpt):
  from grood_jax import data
  try:
    data.load_fashion_mnist(None, download=False)
  except data.DataError:
    pytest.skip("Fashion-MNIST is not available offline")
  _assert_user_error(capsys, ["--ckpt", ckpt, "--benchmark", "fashion_mnist"],
                     tmp_path / "out", f"has 6 classes but benchmark 'fashion_mnist' has 10")


# ----------------------------------------------------------------------------- names, specs


@pytest.mark.parametrize("args, match", [
    (["--detectors", "msp,nosuch"], "nosuch"),
    (["--benchmark", "nosuch"], "unknown benchmark 'nosuch'"),
    (["--param", "knn.nosuch=3"], "nosuch"),
    (["--param", "knn"], "DETECTOR.KEY=VALUE"),
    (["--ood", "middle:x=npz:a.npz"], "bad OOD spec"),
    (["--ood", "far:"], "bad OOD spec"),
    (["--ood", "far:x=nosuch"], "unknown data source"),
    (["--batch-size", "0"], "--batch-size"),
    (["--nosuch-flag"], "unrecognized arguments"),
    (["--seed", "abc"], "invalid int value"),
])
def test_bad_names_and_specs(capsys, tmp_path, ckpt, args, match):
  _assert_user_error(capsys, ["--ckpt", ckpt, *args], tmp_path / "out", match)


def test_out_under_a_regular_file(capsys, tmp_path, ckpt):
  (tmp_path / "file").write_text("keep me")
  _assert_user_error(capsys, ["--ckpt", ckpt], tmp_path / "file" / "report", "is a file")
  _assert_user_error(capsys, ["--ckpt", ckpt], tmp_path / "file", "not a directory")
  assert (tmp_path / "file").read_text() == "keep me"


def test_out_existing_is_untouched_on_error(capsys, tmp_path, ckpt):
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text("{}")
  _assert_user_error(capsys, ["--ckpt", ckpt, "--ood", "far:x=npz:/nonexistent.npz"], out,
                     "no such file")


# ----------------------------------------------------------------------------- data


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return f"far:bad=npz:{path}"


@pytest.mark.parametrize("arrays, match", [
    ({"pixels": np.zeros((4, 28, 28), np.uint8)}, "no array named 'images'"),
    ({"images": np.zeros((4, 28), np.uint8)}, "must have shape"),
    ({"images": np.zeros((4, 28, 28, 1, 1), np.uint8)}, "must have shape"),
    ({"images": np.zeros((4, 28, 28), np.int64)}, "dtype int64"),
    ({"images": np.zeros((4, 28, 28), "<U1")}, "dtype <U1"),
    ({"images": np.full((4, 28, 28), np.nan, np.float32)}, "NaN or Inf"),
    ({"images": np.full((4, 28, 28), np.inf, np.float32)}, "NaN or Inf"),
    ({"images": np.full((4, 28, 28), 2.0, np.float32)}, "[0, 1]"),
    ({"images": np.zeros((0, 28, 28), np.uint8)}, "empty"),
    ({"images": np.zeros((4, 28, 28, 7), np.uint8)}, "channels"),
    ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.zeros(3)}, "labels"),
])
def test_bad_npz(capsys, tmp_path, ckpt, arrays, match):
  spec = _npz(tmp_path / "bad.npz", **arrays)
  _assert_user_error(capsys, ["--ckpt", ckpt, "--ood", spec], tmp_path / "out", match)


def test_npz_garbage_bytes(capsys, tmp_path, ckpt):
  (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip file")
  _assert_user_error(capsys, ["--ckpt", ckpt, "--ood", f"far:bad=npz:{tmp_path / 'bad.npz'}"],
                     tmp_path / "out", "not a readable .npz")


def test_folder_none_readable_is_an_error(capsys, tmp_path, ckpt):
  (tmp_path / "imgs" / "a").mkdir(parents=True)
  (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"not a png")
  (tmp_path / "empty").mkdir()
  out = tmp_path / "out"
  _assert_user_error(capsys, ["--ckpt", ckpt, "--ood", f"far:e=folder:{tmp_path / 'empty'}"],
                     out, "no readable images")
  # score.py reports the data error; the skip warning of the unreadable file comes first
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--ood", f"far:i=folder:{tmp_path / 'imgs'}",
                      "--out", out)
  assert rc == 2 and err.splitlines()[-1].startswith("error: ") and "no readable images" in err
  assert not out.exists()


def test_folder_unreadable_files_are_skipped_with_a_warning(tmp_path):
  (tmp_path / "a").mkdir()
  Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "a" / "ok.png")
  (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
    s = load_folder(str(tmp_path), image_shape=(28, 28, 1))
  assert s.images.shape == (1, 28, 28, 1) and list(s.labels) == [0]


def test_rgb_32_is_converted_for_a_28x28x1_model(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
  np.savez(tmp_path / "rgb.npz", images=rgb)
  s = load_source(f"npz:{tmp_path / 'rgb.npz'}", image_shape=(28, 28, 1))
  assert s.images.shape == (5, 28, 28, 1) and s.images.dtype == np.uint8
  # grey by BT.601 luminance first, then a bilinear resize: a flat colour stays that grey
  flat = np.broadcast_to(np.array([200, 100, 50], np.uint8), (1, 32, 32, 3))
  np.savez(tmp_path / "flat.npz", images=flat)
  g = load_source(f"npz:{tmp_path / 'flat.npz'}", image_shape=(28, 28, 1)).images
  assert np.all(g == np.rint(np.array([200, 100, 50]) @ LUMA_WEIGHTS))


# ----------------------------------------------------------------------------- failures, debug


def test_nan_scores_are_an_internal_error(capsys, tmp_path, ckpt, monkeypatch):
  from grood_jax.detectors import detector_class
  monkeypatch.setattr(detector_class("msp"), "score",
                      lambda self, ctx, state, split: np.full(len(split), np.nan, np.float32))
  out = tmp_path / "out"
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--detectors", "msp", "--out", out)
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
  assert "'msp'" in lines[0] and "non-finite" in lines[0] and "of 32" in lines[0]
  assert not (out / "results.json").exists()


def test_debug_shows_the_traceback(capsys, tmp_path, ckpt):
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--detectors", "nosuch", "--debug",
                      "--out", tmp_path / "out")
  assert rc == 2 and "Traceback (most recent call last)" in err
  assert err.splitlines()[-1].startswith("error: ")


# ----------------------------------------------------------------------------- determinism


def test_same_checkpoint_and_seed_give_byte_identical_results(capsys, tmp_path, ckpt):
  rgb = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3)).astype(np.uint8)
  np.savez(tmp_path / "rgb.npz", images=rgb)
  common = ["--ckpt", ckpt, "--detectors", "grood,msp,energy,knn", "--param", "knn.k=5",
            "--param", "grood.n_ood=8", "--ood", f"far:rgb=npz:{tmp_path / 'rgb.npz'}",
            "--no-plots", "--seed", "3"]
  texts = []
  for out in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):   # computed, cached, computed
    rc, _, err = _score(capsys, *common, "--out", out)
    assert rc == 0, err
    texts.append((out / "results.json").read_bytes())
    timing = (out / "timing.json").read_text()
    assert "total_s" in timing and "fit_s" in timing
  assert texts[0] == texts[1] == texts[2]
  assert b"_s\"" not in texts[0] and b"timing" not in texts[0]
  assert b'"rgb"' in texts[0]          # the RGB 32x32 set was converted and scored


# ----------------------------------------------------------------------------- train.py


def _train(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                        cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("config, extra, match", [
    ("configs/nosuch.py", [], "config file"),
    ("configs/fashion_mnist_6v4_cnn.py:nosuch", [], "unknown config variant 'nosuch'"),
    ("configs/fashion_mnist_6v4_cnn.py:smoke", ["--config.nosuch=1"], "unknown config field 'nosuch'"),
    ("configs/fashion_mnist_6v4_cnn.py:smoke", ["--config.batch_size=abc"], "batch_size"),
    ("configs/fashion_mnist_6v4_cnn.py:smoke", ["--config.benchmark=nosuch"], "unknown benchmark"),
    ("configs/fashion_mnist_6v4_cnn.py:smoke", ["--config.loss=nosuch"], "unknown loss 'nosuch'"),
    ("configs/fashion_mnist_6v4_cnn.py:smoke", ["--config.batch_size=0"], "batch_size=0"),
])
def test_train_bad_config(tmp_path, config, extra, match):
  work = tmp_path / "work"
  r = _train("--config", config, "--workdir", work, *extra)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2, r.stderr
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
  assert not work.exists()


def test_train_workdir_under_a_file(tmp_path):
  (tmp_path / "file").write_text("x")
  r = _train("--config", "configs/fashion_mnist_6v4_cnn.py:smoke", "--workdir",
             tmp_path / "file" / "work")
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "is a file" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
