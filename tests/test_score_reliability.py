"""score.py reliability (issue 13): every value checked before any work, unreadable cache files
recomputed, disk-full errors as one line, the report swapped in whole, one writer per --out.

Runs score.main in-process on the tiny synthetic benchmark of test_cli_errors.
"""

import errno
import glob
import os
import subprocess
import sys

import pytest

from test_cli_errors import ROOT, _assert_user_error, _save, _score, _snapshot

from grood_jax import report, scoring
from grood_jax.fileio import lock_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("ckpt_rel"))


@pytest.fixture
def no_features(monkeypatch):
  """Feature extraction is the first slow step: any check after it comes too late."""
  def boom(*a, **k):
    raise AssertionError("features were extracted before every input was checked")
  monkeypatch.setattr(scoring, "extract", boom)


def _errors(err):
  return [line for line in err.splitlines() if line.startswith("error: ")]


def _warnings(err):
  return [line for line in err.splitlines() if line.startswith("warning: ")]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("args, match", [
    (["--detectors", "knn", "--param", "knn.k=1.5"], "not an integer"),
    (["--detectors", "knn", "--param", "knn.k=abc"], "not a number"),
    (["--detectors", "react", "--param", "react.percentile=150"], "out of range"),
    (["--detectors", "grood", "--param", "grood.tau=nan"], "not a number"),
    (["--detectors", "grood", "--param", "grood.k=abc"], "not a number"),
    # needs the bank size (64 train images): checked after loading, before any feature
    (["--detectors", "knn", "--param", "knn.k=65"], "larger than the bank of 64"),
    (["--detectors", "grood", "--param", "grood.k=100"], "larger than the 64 training"),
    # a --select grid point that cannot work (knn's grid goes to k=200) is refused up front
    (["--detectors", "msp,knn", "--select"], "--select grid point knn {'k': 100}"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--batch-size", "-3"], "--batch-size -3"),
    (["--max-per-set", "0"], "--max-per-set 0"),
    (["--devices", "-2"], "--devices -2"),
])
def test_values_checked_before_any_work(capsys, tmp_path, ckpt, no_features, args, match):
  _assert_user_error(capsys, ["--ckpt", ckpt, *args], tmp_path / "out", match)


def test_out_name_too_long(capsys, tmp_path, ckpt, no_features):
  _assert_user_error(capsys, ["--ckpt", ckpt], tmp_path / ("x" * 300), "longer than the file")
  # the last name must leave room for the temporary report beside it
  _assert_user_error(capsys, ["--ckpt", ckpt], tmp_path / ("y" * 250), "leave room")
  deep = str(tmp_path) + ("/" + "d" * 200) * 21                   # > PATH_MAX (4096)
  _assert_user_error(capsys, ["--ckpt", ckpt], deep, "the path is")


def test_out_holding_other_files_is_refused(capsys, tmp_path, ckpt, no_features):
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text("{}")
  (out / "notes.txt").write_text("mine")
  line = _assert_user_error(capsys, ["--ckpt", ckpt], out, "no report wrote (notes.txt)")
  assert "replaced whole" in line and (out / "notes.txt").read_text() == "mine"


def test_out_parent_not_writable(capsys, tmp_path, ckpt, no_features):
  if os.geteuid() == 0:
    pytest.skip("root writes anywhere")
  parent = tmp_path / "ro"
  (parent / "out").mkdir(parents=True)
  parent.chmod(0o555)
  try:
    _assert_user_error(capsys, ["--ckpt", ckpt], parent / "out", "parent")
  finally:
    parent.chmod(0o755)


# ----------------------------------------------------------------------------- cache


def _cache_files(out):
  return sorted(glob.glob(os.path.join(out, "cache", "feats-*.npz")))


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_unreadable_cache_file_is_recomputed_with_one_warning(capsys, tmp_path, ckpt, damage):
  out = tmp_path / "out"
  argv = ["--ckpt", ckpt, "--detectors", "msp,energy", "--no-plots", "--out", out]
  rc, _, err = _score(capsys, *argv)
  assert rc == 0, err
  first = (out / "results.json").read_bytes()
  files = _cache_files(out)
  assert files
  victim = files[0]
  size = os.path.getsize(victim)
  with open(victim, "r+b") as f:
    if damage == "truncate":           # a truncated zip: BadZipFile, before this fix fatal
      f.truncate(size // 2)
    elif damage == "random":
      f.write(os.urandom(size))
    else:
      f.truncate(0)
  rc, _, err = _score(capsys, *argv)
  assert rc == 0, err
  warns = _warnings(err)
  assert len(warns) == 1 and "unreadable" in warns[0] and "recomputing" in warns[0], err
  assert os.path.basename(victim) in warns[0]
  assert "Traceback" not in err
  assert (out / "results.json").read_bytes() == first
  rc, _, err = _score(capsys, *argv)                      # repaired: no warning any more
  assert rc == 0 and not _warnings(err), err


def _enospc(*a, **k):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_writing_the_cache(capsys, tmp_path, ckpt, monkeypatch):
  monkeypatch.setattr(scoring, "atomic_write", _enospc)
  out = tmp_path / "out"
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--detectors", "msp", "--out", out)
  errs = _errors(err)
  assert rc == 2 and len(errs) == 1 and "Traceback" not in err, err
  assert "No space left on device" in errs[0] and "--no-cache" in errs[0]
  assert not _cache_files(out) and not (out / "results.json").exists()


def test_disk_full_writing_the_report_keeps_the_old_one(capsys, tmp_path, ckpt, monkeypatch):
  out = tmp_path / "out"
  argv = ["--ckpt", ckpt, "--detectors", "msp,energy", "--out", out]
  rc, _, err = _score(capsys, *argv)
  assert rc == 0, err
  before = _contents(out)
  calls = []
  real = report.atomic_write

  def full_after_three(path, write, **kw):
    calls.append(path)
    if len(calls) > 3:
      _enospc()
    return real(path, write, **kw)

  monkeypatch.setattr(report, "atomic_write", full_after_three)
  rc, _, err = _score(capsys, *argv, "--seed", "1")
  errs = _errors(err)
  assert rc == 2 and len(errs) == 1 and "Traceback" not in err, err
  assert "No space left on device" in errs[0] and "free some disk space" in errs[0]
  assert _contents(out) == before                            # the old report, whole
  assert _siblings(out) == []                                # no temporary left beside it


def _contents(out):
  return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))
          if os.path.isfile(os.path.join(out, n)) and n != ".grood.lock"}


def _siblings(out):
  base = os.path.basename(out)
  return [n for n in os.listdir(os.path.dirname(out)) if n.startswith(f".{base}.")]


# ----------------------------------------------------------------------------- swap, kill


def test_failure_between_files_never_mixes_reports(capsys, tmp_path, ckpt, monkeypatch):
  out = tmp_path / "out"
  argv = ["--ckpt", ckpt, "--detectors", "msp,energy", "--out", out]
  assert _score(capsys, *argv)[0] == 0
  before = _contents(out)
  cache = _cache_files(out)

  def fail(*a, **k):               # results.json, csv, md, scores.npz are written by now
    raise RuntimeError("injected failure between files")

  monkeypatch.setattr(report, "plot_roc", fail)
  rc, _, err = _score(capsys, *argv, "--seed", "2")
  assert rc == 1 and "injected failure" in err
  assert _contents(out) == before and _siblings(out) == []
  assert set(cache) <= set(_cache_files(out))                # the cache stays (and grows)
  monkeypatch.undo()
  assert _score(capsys, *argv, "--seed", "2")[0] == 0
  after = _contents(out)
  assert after["results.json"] != before["results.json"]     # a new run, swapped in whole
  assert set(after) == set(before) and set(cache) <= set(_cache_files(out))


_KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_cli_errors as t
from grood_jax import report
real = report.plot_histograms
def killed(*a, **k):
  real(*a, **k)                    # one histogram written into the new report, then SIGKILL
  os.kill(os.getpid(), signal.SIGKILL)
report.plot_histograms = killed
sys.exit(t.score.main({argv!r}))
"""


def test_sigkill_mid_write_leaves_the_old_report_whole(capsys, tmp_path, ckpt):
  out = str(tmp_path / "out")
  argv = ["--ckpt", ckpt, "--detectors", "msp,energy", "--out", out]
  assert _score(capsys, *argv)[0] == 0
  before = _contents(out)
  code = _KILLER.format(tests=os.path.join(ROOT, "tests"), argv=argv + ["--seed", "4"])
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     cwd=ROOT)
  assert r.returncode == -9, r.stderr
  assert _contents(out) == before                            # not a file of the killed run
  assert len(_siblings(out)) == 1                            # its temporary, beside --out
  rc, _, err = _score(capsys, *argv, "--seed", "4")          # the next run cleans it up
  assert rc == 0, err
  assert _siblings(out) == [] and _contents(out)["results.json"] != before["results.json"]


# ----------------------------------------------------------------------------- lock


def test_second_writer_gets_one_line_naming_the_pid(capsys, tmp_path, ckpt, no_features):
  out = tmp_path / "out"
  with lock_dir(out, "--out"):                 # another run holds --out
    before = _snapshot(out)
    line = _assert_user_error(capsys, ["--ckpt", ckpt, "--detectors", "msp"], out, "in use by")
    assert f"PID {os.getpid()}" in line and "--out" in line
    assert _snapshot(out) == before


def test_lock_is_held_for_the_whole_run(capsys, tmp_path, ckpt, monkeypatch):
  out = tmp_path / "out"
  seen = []
  real = report.write_report

  def probe(*a, **k):                          # while the report is written, --out is locked
    from grood_jax.errors import LockError
    with pytest.raises(LockError, match="in use by"):
      lock_dir(out, "--out").acquire()
    seen.append(True)
    return real(*a, **k)

  monkeypatch.setattr(report, "write_report", probe)
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--detectors", "msp", "--out", out)
  assert rc == 0 and seen, err
  with lock_dir(out, "--out"):                 # released at the end
    pass
