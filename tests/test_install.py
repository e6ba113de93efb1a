"""The package as a user installs it: a wheel (non-editable) put into a fresh directory, its
console scripts run from a directory outside the clone, a smoke train + score with the
packaged config addressed by name."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("install")
  whl_dir, site = tmp / "wheel", tmp / "site"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(whl_dir), ROOT], check=True, capture_output=True)
  assert not os.path.exists(os.path.join(ROOT, "build")), "the build left build/ in the tree"
  (whl,) = list(whl_dir.iterdir())
  names = zipfile.ZipFile(whl).namelist()
  assert "grood_jax/configs/fashion_mnist_6v4_cnn.py" in names
  assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(site), str(whl)], check=True, capture_output=True)
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
  env["PYTHONPATH"] = str(site)            # ahead of the clone's editable install
  env["PATH"] = str(site / "bin") + os.pathsep + env.get("PATH", "")
  work = tmp / "elsewhere"
  work.mkdir()
  return site, env, work


def _run(args, env, cwd):
  return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)


def test_console_scripts_run_from_the_installed_package(installed):
  site, env, work = installed
  r = _run([sys.executable, "-c", "import grood_jax; print(grood_jax.__file__)"], env, work)
  assert r.stdout.strip().startswith(str(site)), r.stdout
  for cmd in ("grood-score", "grood-train", "grood-convert"):
    r = _run([str(site / "bin" / cmd), "--help"], env, work)
    assert r.returncode == 0, (cmd, r.stderr[-2000:])
    assert "usage" in (r.stdout + r.stderr).lower()
  r = _run([sys.executable, "-m", "grood_jax.cli.score", "--list-detectors"], env, work)
  assert r.returncode == 0 and "grood" in r.stdout
  r = _run([str(site / "bin" / "grood-train"), "--config", "no_such_config", "--workdir",
            str(work / "w")], env, work)
  assert r.returncode == 2 and r.stderr.strip().startswith("error:")


@pytest.mark.slow
def test_smoke_train_and_score_outside_the_clone(installed):
  site, env, work = installed
  r = _run([str(site / "bin" / "grood-train"), "--config", "fashion_mnist_6v4_cnn:smoke",
            "--workdir", str(work / "run"), "--noprogress"], env, work)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run([str(site / "bin" / "grood-score"), "--ckpt", str(work / "run"), "--detectors",
            "msp,energy", "--out", str(work / "report"), "--no-plots"], env, work)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(work / "report" / "results.json")
