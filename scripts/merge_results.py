"""One leaderboard from several score.py runs on the same checkpoints.

  python scripts/merge_results.py results/fashion_mnist_6v4/results.json \
      results/new_detectors_6v4/results.json ... --out results/leaderboard_6v4

Later files replace the rows of earlier ones with the same detector name (a row re-measured
under a newer definition simply comes in a later file); `--drop NAME` leaves a row out of the
leaderboard altogether. Rows of results.json
files written before schema 2 carry no `outlier_data`: it is filled in from the detector
setting (`uses_outlier_data()` of the registered detector with the row's parameters; labels
such as `grood[default]` name the detector before the bracket) or from a checkpoint trained on
outliers. Writes results.json / results.md / results.csv into --out and prints the summary
table (the two outlier-data groups ranked apart) as Markdown for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grood_jax import report, stats  # noqa: E402
from grood_jax.detectors import detector_names, make_detector  # noqa: E402


def fill_outlier_flags(results: dict) -> dict:
  """Sets each row's `outlier_data` where it is missing (see the module docstring)."""
  metas = results.get("meta_per_run") or [results.get("meta") or {}]
  trained = any(bool(m.get("training_uses_outlier_data")) for m in metas)
  known = set(detector_names())
  for label, det in results["detectors"].items():
    if "outlier_data" in det:
      continue
    name = label if label in known else label.split("[", 1)[0]
    det["outlier_data"] = bool(trained or make_detector(name, **det.get("params", {}))
                               .uses_outlier_data())
  return results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("inputs", nargs="+", help="results.json files, later ones win")
  p.add_argument("--drop", action="append", default=[], help="a detector row to leave out (of every input)")
  p.add_argument("--out", required=True, help="directory for the merged results")
  args = p.parse_args(argv)
  parts = []
  for path in args.inputs:
    with open(path, encoding="utf-8") as f:
      r = json.load(f)
    for name in args.drop:
      r["detectors"].pop(name, None)
      (r.get("selection") or {}).pop(name, None)
    parts.append(fill_outlier_flags(r))
  merged = stats.merge_results(parts)
  merged["merged_from"] = [dict(m, file=path) for m, path in zip(merged["merged_from"],
                                                                args.inputs)]
  os.makedirs(args.out, exist_ok=True)
  report.write_json(merged, os.path.join(args.out, "results.json"))
  with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
    f.write(report.to_markdown(merged))
  report.to_csv(merged, os.path.join(args.out, "results.csv"))
  print(report.summary_markdown(merged))
  return 0


if __name__ == "__main__":
  sys.exit(main())
