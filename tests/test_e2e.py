"""End to end: smoke-train on real Fashion-MNIST, then score.py writes a valid report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST) and not os.environ.get("GROOD_DATA_DIR"),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_smoke_train_then_score(tmp_path):
  work = tmp_path / "run"
  out = tmp_path / "report"
  env = {**os.environ, "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/fashion_mnist_6v4_cnn.py:smoke",
                      "--workdir", str(work), "--noprogress"], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  r = subprocess.run([sys.executable, "score.py", "--ckpt", str(work), "--out", str(out),
                      "--detectors", "grood,msp,energy,knn"], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "grood" in r.stdout and "Near AUROC" in r.stdout
  res = json.loads((out / "results.json").read_text())
  assert res["benchmark"] == "fashion_mnist_6v4"
  assert 0.3 < res["classifier_accuracy"] <= 1.0
  assert set(res["detectors"]) == {"grood", "msp", "energy", "knn"}
  sets = {"fmnist_6to9": "near", "letters": "far", "mnist": "far", "textures": "far"}
  for name, d in res["detectors"].items():
    assert set(d["ood"]) == set(sets)
    for s, m in d["ood"].items():
      assert m["group"] == sets[s]
      for k in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood"):
        assert 0.0 <= m[k] <= 1.0
    assert d["near"]["auroc"] == pytest.approx(d["ood"]["fmnist_6to9"]["auroc"])
    far = [d["ood"][s]["auroc"] for s in ("letters", "mnist", "textures")]
    assert d["far"]["auroc"] == pytest.approx(sum(far) / 3)
    assert 0.0 <= d["accuracy"] <= 1.0
  # textures are trivially far from clothing for a kNN on features, even after one epoch
  assert res["detectors"]["knn"]["ood"]["textures"]["auroc"] > 0.8
  for f in ("results.csv", "results.md", "report.html", "roc.png", "auroc_bars.png"):
    assert (out / f).stat().st_size > 0
