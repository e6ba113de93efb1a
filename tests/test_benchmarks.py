"""Smoke runs of every benchmark in --quick mode (a subprocess each; results to a tmp dir).

Only checks that each script runs and writes its JSON and PNG; the figures themselves come
from the full runs (benchmarks/results). torch / faiss columns are skipped when absent.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,extra", [
    ("knn", ["--no-memory"]),
    ("grads", ["--subset", "5"]),
    ("end_to_end", ["--rounds", "1"]),      # one timed round: this is a smoke run
    ("train_step", ["--devices", "2"]),
    ("forward", []),
])
def test_benchmark_quick(name, extra, tmp_path):
  if name == "forward":            # ours against torch, nothing else: torch needed
    pytest.importorskip("torch")
  if name == "end_to_end":        # its reference side IS the comparison: torch + faiss needed
    pytest.importorskip("torch")
    pytest.importorskip("faiss", reason="faiss-cpu not installed (requirements-bench.txt)")
  res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"),
                        "--quick", "--out", str(tmp_path), *extra],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert res.returncode == 0, res.stderr[-3000:]
  payload = json.loads((tmp_path / f"{name}.json").read_text())
  assert payload["machine"]["jax_backend"] and payload["rows"]
  assert (tmp_path / f"{name}.png").exists()
  assert "loaded" in payload and payload["conditions"]["cores"] >= 1
  if name == "forward":
    for r in payload["rows"]:       # same weights on both sides, all three sides timed
      assert r["logits_rel_diff"] < 1e-4 and r["cl_logits_max_abs_diff"] < 1e-3, r
      assert min(r["ours_img_s"], r["torch_nchw_img_s"], r["torch_cl_img_s"]) > 0
      assert r["ratio_nchw"] == pytest.approx(r["torch_nchw_img_s"] / r["ours_img_s"])
      assert r["torch_threads"] == r["threads"]
  if name == "train_step":
    try:
      import torch  # noqa: F401
    except ImportError:
      assert payload["torch_rows"] == []
    else:             # the torch column: same initial weights, so the same first loss
      (r,) = payload["torch_rows"]
      assert r["first_loss_ours"] == pytest.approx(r["first_loss_torch"], rel=1e-3), r
      assert min(r["ours_steps_per_s"], r["torch_steps_per_s"],
                 r["torch_1thread_steps_per_s"]) > 0
      assert r["torch_threads"] == payload["conditions"]["torch_threads"]
