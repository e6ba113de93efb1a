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
    ("end_to_end", ["--subset", "20"]),
    ("train_step", ["--devices", "2"]),
])
def test_benchmark_quick(name, extra, tmp_path):
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
