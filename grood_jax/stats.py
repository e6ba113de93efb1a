"""The numbers behind a report: group means over OOD sets, mean ± std over runs, metrics
recomputed from saved per-sample scores. No rendering (that is grood_jax.report).

  group_means(per_set)           {"near": {metric: mean}, "far": {...}}
  aggregate_runs([r0, r1, r2])   one results dict with means and "std" beside them
  metrics_from_scores(s_id, s)   the five OOD metrics of one detector on one set
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np

from grood_jax import metrics as _metrics

METRICS = _metrics.METRIC_NAMES
GROUPS = ("near", "far")


def is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def group_means(per_set: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
  """Unweighted means of the metrics over the OOD sets of each group.

  `per_set` is {SET: {"group": "near" | "far", metric: value, ...}}. Returns
  {"near": {metric: mean}, "far": {...}}; a group with no sets is omitted. Only the metrics of
  METRICS present in every set of the group are averaged; per-set "std" entries are ignored.
  """
  out = {}
  for group in GROUPS:
    sets = [m for m in per_set.values() if m.get("group") == group]
    if not sets:
      continue
    keys = [k for k in METRICS if all(k in m for m in sets)]
    out[group] = {k: float(np.mean([float(m[k]) for m in sets])) for k in keys}
  return out


def _std(values: Sequence[float]) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _aggregate_metric_dicts(dicts: Sequence[Mapping], where: str) -> dict:
  """Means of the numeric entries of several metric dicts, plus "std": {key: std}."""
  out, std = {}, {}
  for key, value in dicts[0].items():
    if key == "std":
      continue
    if is_number(value):
      missing = [i for i, d in enumerate(dicts) if not is_number(d.get(key))]
      if missing:
        raise ValueError(f"{where}: metric {key!r} missing in run(s) {missing}")
      values = [float(d[key]) for d in dicts]
      out[key] = float(np.mean(values))
      std[key] = _std(values)
    else:
      for i, d in enumerate(dicts):
        if d.get(key) != value:
          raise ValueError(f"{where}: {key!r} differs between run 0 ({value!r}) and run {i} "
                           f"({d.get(key)!r})")
      out[key] = copy.deepcopy(value)
  out["std"] = std
  return out


def aggregate_runs(runs: Sequence[Mapping]) -> dict:
  """Mean and standard deviation of several results dicts (one per checkpoint).

  Every numeric metric (classifier accuracy, detector accuracy, each per-set metric and each
  near / far mean) becomes the mean over runs, with its standard deviation beside it: the sample
  std (ddof=1) when there are several runs, 0.0 for a single run. Near / far entries are the
  mean over runs of each run's group means (equal to the group means of the per-set means) and
  their std is the spread of the per-run group means across checkpoints.

  The runs must share the benchmark, the detectors and each detector's OOD sets and groups.
  "checkpoint" becomes the list of the runs' checkpoints. A detector's "params" and the
  "selection" are taken from the first run; when they differ between runs, the per-run values
  are kept under "params_per_run" / "selection_per_run". "timing" and "meta" become per-run
  lists "timing_per_run" / "meta_per_run". The result also carries "n_runs".
  """
  runs = list(runs)
  if not runs:
    raise ValueError("aggregate_runs needs at least one results dict")
  first = runs[0]
  for i, r in enumerate(runs):
    if r.get("benchmark") != first.get("benchmark"):
      raise ValueError(f"run {i} is benchmark {r.get('benchmark')!r}, run 0 is "
                       f"{first.get('benchmark')!r}")
    if set(r["detectors"]) != set(first["detectors"]):
      raise ValueError(f"run {i} has detectors {sorted(r['detectors'])}, run 0 has "
                       f"{sorted(first['detectors'])}")

  checkpoints = []
  for r in runs:
    c = r.get("checkpoint")
    checkpoints.extend(c if isinstance(c, (list, tuple)) else [c])
  out = {"benchmark": first.get("benchmark"), "checkpoint": checkpoints, "n_runs": len(runs)}
  if all(is_number(r.get("classifier_accuracy")) for r in runs):
    accs = [float(r["classifier_accuracy"]) for r in runs]
    out["classifier_accuracy"] = float(np.mean(accs))
    out["classifier_accuracy_std"] = _std(accs)

  detectors = {}
  for name, det0 in first["detectors"].items():
    dets = [r["detectors"][name] for r in runs]
    agg = {"params": copy.deepcopy(det0.get("params", {}))}
    if any("outlier_data" in d for d in dets):      # in the outlier group if any run is
      agg["outlier_data"] = any(bool(d.get("outlier_data")) for d in dets)
    if any(d.get("params", {}) != det0.get("params", {}) for d in dets):
      agg["params_per_run"] = [copy.deepcopy(d.get("params", {})) for d in dets]
    if all(is_number(d.get("accuracy")) for d in dets):
      accs = [float(d["accuracy"]) for d in dets]
      agg["accuracy"] = float(np.mean(accs))
      agg["accuracy_std"] = _std(accs)
    agg["ood"] = {}
    for set_name in det0.get("ood", {}):
      per_run = []
      for i, d in enumerate(dets):
        if set_name not in d.get("ood", {}):
          raise ValueError(f"detector {name!r}: OOD set {set_name!r} missing in run {i}")
        per_run.append(d["ood"][set_name])
      agg["ood"][set_name] = _aggregate_metric_dicts(per_run, f"{name}/{set_name}")
    for group in GROUPS:
      per_run = [d[group] if group in d else group_means(d.get("ood", {})).get(group)
                 for d in dets]
      if all(g is not None for g in per_run):
        agg[group] = _aggregate_metric_dicts(per_run, f"{name}/{group}")
    detectors[name] = agg
  out["detectors"] = detectors

  if "selection" in first:
    out["selection"] = copy.deepcopy(first["selection"])
    if any(r.get("selection") != first["selection"] for r in runs):
      out["selection_per_run"] = [copy.deepcopy(r.get("selection")) for r in runs]
  for key in ("timing", "meta"):
    if any(key in r for r in runs):
      out[f"{key}_per_run"] = [copy.deepcopy(r.get(key)) for r in runs]
  return out


def metrics_from_scores(scores_id, scores_ood) -> dict[str, float]:
  """The five OOD metrics (grood_jax.metrics.ood_metrics) of ID scores against OOD scores,
  e.g. re-computed from scores.npz: equal to the ones in results.json for the same run."""
  return _metrics.ood_metrics(np.asarray(scores_id, np.float64), np.asarray(scores_ood, np.float64))


def _fingerprints(results: Mapping) -> list:
  metas = results.get("meta_per_run") or [results.get("meta") or {}]
  return [m.get("model_fingerprint") for m in metas]


def merge_results(parts: Sequence[Mapping]) -> dict:
  """One results dict from several runs on the SAME checkpoints (e.g. one `--detectors` run per
  group of detectors): detector rows (and their selection) of later parts replace those of
  earlier parts with the same name. The parts must share the benchmark and the checkpoints'
  model fingerprints (meta / meta_per_run "model_fingerprint", in order) — paths may differ,
  the parameters may not; ValueError otherwise. The result keeps the first part's top level
  and lists every part's detectors under "merged_from"."""
  parts = list(parts)
  if not parts:
    raise ValueError("merge_results needs at least one results dict")
  first = parts[0]
  fp0 = _fingerprints(first)
  if any(f is None for f in fp0):
    raise ValueError("merge_results: part 0 has no model fingerprints (meta.model_fingerprint)")
  out = copy.deepcopy(dict(first))
  out["detectors"] = {}
  out.pop("selection", None)
  out.pop("selection_per_run", None)
  selection: dict = {}
  merged_from = []
  for i, r in enumerate(parts):
    if r.get("benchmark") != first.get("benchmark"):
      raise ValueError(f"part {i} is benchmark {r.get('benchmark')!r}, part 0 is "
                       f"{first.get('benchmark')!r}")
    if _fingerprints(r) != fp0:
      raise ValueError(f"part {i} was scored on other checkpoints (model fingerprints "
                       f"{_fingerprints(r)} vs {fp0})")
    for name, det in r["detectors"].items():
      out["detectors"][name] = copy.deepcopy(det)
      selection.pop(name, None)
    for name, sel in (r.get("selection") or {}).items():
      selection[name] = copy.deepcopy(sel)
    merged_from.append({"checkpoint": r.get("checkpoint"), "detectors": list(r["detectors"])})
  if selection:
    out["selection"] = selection
  out["merged_from"] = merged_from
  return out

