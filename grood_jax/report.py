"""Benchmark reports: rendering only — tables (terminal, Markdown, HTML), CSV, JSON, plots,
scores.npz — and the report directory written whole. The numbers come from grood_jax.stats.

A results dict has this schema (all metrics are fractions in [0, 1]):

  {"schema_version": int,
   "benchmark": str, "checkpoint": str | list[str], "classifier_accuracy": float,
   "detectors": {NAME: {"params": {...}, "accuracy": float,
                        "outlier_data": bool,   # uses real outlier data (ranked apart)
                        "ood": {SET: {"group": "near" | "far", "auroc", "aupr_in", "aupr_out",
                                      "fpr95", "fpr95_openood"}},
                        "near": {five metrics, unweighted means over the near sets},
                        "far": {same over the far sets}}},
   "selection": {NAME: {"chosen": {...}, "grid": [{"params": {...}, "auroc": float}, ...]}},
   "meta": {...}}        # selection and meta optional

When several checkpoints were scored (`stats.aggregate_runs`), every metric dict also carries
"std": {metric: value} beside the means, and the detector / top level carry `accuracy_std` /
`classifier_accuracy_std`.

FPR@95 conventions, named everywhere: "FPR95" is the classic one (fraction of OOD accepted when
95 % of ID is accepted); "FPR95-OO" is OpenOOD v1.5's (fraction of ID rejected when 95 % of OOD
is caught). See grood_jax.metrics.

`write_report` writes every file into a temporary directory beside the report directory and
swaps it in whole (an atomic exchange of the two directories where the system has one), so a
crash or SIGKILL mid-way leaves the previous report complete, never a mix of two runs.
"""

from __future__ import annotations

import base64
import csv
import ctypes
import errno
import html
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Iterable, Mapping

import numpy as np

from grood_jax import metrics as _metrics
from grood_jax.errors import OutputError
from grood_jax.fileio import atomic_write, atomic_write_text
from grood_jax.stats import GROUPS, METRICS, group_means, is_number

SCHEMA_VERSION = 2          # of results.json (and scores.npz); raised when a field changes
FPR_LEGEND = ("FPR95 = classic FPR@95 (fraction of OOD accepted when 95% of ID is accepted); "
              "FPR95-OO = OpenOOD v1.5 FPR@95 (fraction of ID rejected when 95% of OOD is caught)")
AUPR_LEGEND = ("AUPR-In: area under precision-recall with ID as the positive class; "
               "AUPR-Out: with OOD as the positive class (scores negated)")
_HEADER_NAMES = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out",
                 "fpr95": "FPR95", "fpr95_openood": "FPR95-OO"}


# --------------------------------------------------------------------------- tables


def _groups_of(det: Mapping) -> dict:
  """The detector's near / far dicts, computed from its per-set metrics when absent."""
  computed = None
  out = {}
  for group in GROUPS:
    if group in det:
      out[group] = det[group]
    else:
      if computed is None:
        computed = group_means(det.get("ood", {}))
      if group in computed:
        out[group] = computed[group]
  return out


def uses_outlier_data(results: Mapping, name: str) -> bool:
  """Whether detector `name` of a results dict used real outlier data (its "outlier_data")."""
  return bool(results["detectors"][name].get("outlier_data", False))


def sorted_detectors(results: Mapping) -> list[str]:
  """Detector names in two groups, as OpenOOD ranks them: first those that use no real outlier
  data, then those that do; within each by near-OOD AUROC, descending (then far AUROC, name)."""
  def key(name):
    groups = _groups_of(results["detectors"][name])
    near = groups.get("near", {}).get("auroc")
    far = groups.get("far", {}).get("auroc")
    near = -math.inf if near is None or not math.isfinite(near) else float(near)
    far = -math.inf if far is None or not math.isfinite(far) else float(far)
    return (uses_outlier_data(results, name), -near, -far, name)
  return sorted(results.get("detectors", {}), key=key)


def group_ranks(results: Mapping) -> dict[str, int]:
  """{detector: rank by near-OOD AUROC within its group (no outlier data / outlier data)},
  1 = best; the order of `sorted_detectors`."""
  ranks, seen = {}, {False: 0, True: 0}
  for name in sorted_detectors(results):
    g = uses_outlier_data(results, name)
    seen[g] += 1
    ranks[name] = seen[g]
  return ranks


OUTLIER_LEGEND = ("Outliers = uses real outlier data (OpenOOD's \"Outlier_Data: Yes\": e.g. "
                  "GROOD's oodval source, a GReg/GReg+ checkpoint); Rank = by near AUROC within "
                  "its group (no / yes), ranked apart as OpenOOD does")


def _pct(value, std=None) -> str:
  if value is None:
    return "-"
  s = f"{100.0 * float(value):.2f}"
  if std is not None:
    s += f" ± {100.0 * float(std):.2f}"
  return s


def _cell(d: Mapping | None, key: str) -> str:
  if not d or key not in d:
    return "-"
  return _pct(d[key], d.get("std", {}).get(key))


def _checkpoint_text(results: Mapping) -> str:
  c = results.get("checkpoint", "")
  if isinstance(c, (list, tuple)):
    return ", ".join(str(x) for x in c)
  return str(c)


def _summary_rows(results: Mapping, openood: bool,
                  keys: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
  if keys is None:
    keys = ["auroc", "aupr_in", "aupr_out", "fpr95"] + (["fpr95_openood"] if openood else [])
  header = ["Detector", "Outliers", "Rank"]
  header += [f"{g.capitalize()} {_HEADER_NAMES[k]}" for k in keys for g in GROUPS]
  header += ["Accuracy"]
  rows = []
  ranks = group_ranks(results)
  for name in sorted_detectors(results):
    det = results["detectors"][name]
    g = _groups_of(det)
    row = [name, "yes" if uses_outlier_data(results, name) else "no", str(ranks[name])]
    row += [_cell(g.get(group), k) for k in keys for group in GROUPS]
    acc = det.get("accuracy")
    row += [_pct(acc, det.get("accuracy_std")) if acc is not None else "-"]
    rows.append(row)
  return header, rows


def _ordered_sets(results: Mapping) -> list[tuple[str, str]]:
  """(set, group) over all detectors: near sets first, then far, in first-seen order."""
  seen = {}
  for det in results.get("detectors", {}).values():
    for set_name, m in det.get("ood", {}).items():
      seen.setdefault(set_name, m.get("group", ""))
  rank = {g: i for i, g in enumerate(GROUPS)}
  return sorted(seen.items(), key=lambda kv: rank.get(kv[1], len(GROUPS)))


def _per_set_rows(results: Mapping, openood: bool) -> tuple[list[str], list[list[str]]]:
  keys = ["auroc", "aupr_in", "aupr_out", "fpr95"] + (["fpr95_openood"] if openood else [])
  header = ["Set", "Group", "Detector"] + [_HEADER_NAMES[k] for k in keys]
  order = sorted_detectors(results)
  rows = []
  for set_name, group in _ordered_sets(results):
    for name in order:
      m = results["detectors"][name].get("ood", {}).get(set_name)
      if m is None:
        continue
      rows.append([set_name, group, name] + [_cell(m, k) for k in keys])
  return header, rows


def _params_text(params) -> str:
  if isinstance(params, Mapping):
    return ", ".join(f"{k}={_params_value(v)}" for k, v in params.items()) or "-"
  return str(params)


def _params_value(v) -> str:
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


def _selection_rows(results: Mapping) -> tuple[list[str], list[list[str]]]:
  header = ["Detector", "Chosen params", "Grid size", "Best val AUROC"]
  rows = []
  for name, sel in results.get("selection", {}).items():
    grid = sel.get("grid", []) or []
    aurocs = [g["auroc"] for g in grid if is_number(g.get("auroc"))]
    best = _pct(max(aurocs)) if aurocs else "-"
    rows.append([name, _params_text(sel.get("chosen", {})), str(len(grid)), best])
  return header, rows


def _grid_rows(sel: Mapping) -> tuple[list[str], list[list[str]], int | None]:
  """One row per grid point: the parameters that vary over the grid, its val AUROC; and the
  index of the chosen point (None when it is not in the grid)."""
  grid = sel.get("grid", []) or []
  keys: list[str] = []
  for g in grid:
    for k, v in (g.get("params") or {}).items():
      if k not in keys and any((h.get("params") or {}).get(k) != v for h in grid):
        keys.append(k)
  if not keys and grid:
    keys = list((grid[0].get("params") or {}))
  header = keys + ["Val AUROC"]
  rows, chosen_at = [], None
  chosen = sel.get("chosen") or {}
  for i, g in enumerate(grid):
    p = g.get("params") or {}
    rows.append([_params_value(p.get(k, "-")) for k in keys]
                + [_pct(g["auroc"]) if is_number(g.get("auroc")) else "-"])
    if chosen_at is None and all(chosen.get(k) == v for k, v in p.items()):
      chosen_at = i
  return header, rows, chosen_at


def _param_rows(results: Mapping) -> tuple[list[str], list[list[str]]]:
  """Each detector's parameters as used (defaults, --param overrides or the selected point)."""
  header = ["Detector", "Parameters", "Chosen by"]
  rows = []
  for name in sorted_detectors(results):
    det = results["detectors"][name]
    how = ("--select" if name in results.get("selection", {}) else
           "authors' default" if name.endswith("[default]") else
           "the shipped OpenOOD config" if name.endswith("[openood]") else "defaults / --param")
    rows.append([name, _params_text(det.get("params", {})), how])
  return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  def line(cells):
    parts = []
    for i, (c, w) in enumerate(zip(cells, widths)):
      parts.append(str(c).ljust(w) if i == 0 or not _numeric_column(header[i]) else
                   str(c).rjust(w))
    return "  ".join(parts).rstrip()
  out = [line(header), "  ".join("-" * w for w in widths)]
  out += [line(r) for r in rows]
  return "\n".join(out)


def _numeric_column(name: str) -> bool:
  return any(t in name for t in ("AUROC", "FPR95", "Accuracy", "AUPR", "size", "Rank"))


def _title(results: Mapping) -> str:
  return f"{results.get('benchmark', '?')} — {_checkpoint_text(results)}"


def _classifier_line(results: Mapping) -> str | None:
  acc = results.get("classifier_accuracy")
  if acc is None:
    return None
  return f"Classifier accuracy: {_pct(acc, results.get('classifier_accuracy_std'))} %"


def format_table(results: Mapping, openood_fpr: bool = False) -> str:
  """Terminal tables: the summary (sorted by near-OOD AUROC, descending) and the per-set table.

  Values in %, 2 decimals, "± s" when a std is present; AUROC, AUPR-In, AUPR-Out and the
  classic FPR@95 ("FPR95") per group (summary) and per set.
  Pass openood_fpr=True to add OpenOOD's convention ("FPR95-OO") as extra columns.
  """
  lines = [f"Benchmark: {results.get('benchmark', '?')}",
           f"Checkpoint: {_checkpoint_text(results)}"]
  cl = _classifier_line(results)
  if cl:
    lines.append(cl)
  lines += ["", _text_table(*_summary_rows(results, openood_fpr)), "",
            "Per OOD set:", _text_table(*_per_set_rows(results, openood_fpr)), "", FPR_LEGEND,
            AUPR_LEGEND, OUTLIER_LEGEND]
  return "\n".join(lines) + "\n"


def _md_escape(s) -> str:
  s = str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
  return s.replace("<", "&lt;").replace(">", "&gt;")  # no raw HTML from names


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  align = ["---:" if _numeric_column(h) else ":---" for h in header]
  out = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
         "| " + " | ".join(align) + " |"]
  out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
  return "\n".join(out)


def summary_markdown(results: Mapping, keys=("auroc", "fpr95", "fpr95_openood")) -> str:
  """The summary table alone in Markdown (the two outlier-data groups, each ranked), with the
  metrics `keys` for near and far: e.g. for a README."""
  return _md_table(*_summary_rows(results, True, list(keys)))


def to_markdown(results: Mapping) -> str:
  """The same tables in Markdown (both FPR@95 conventions), the detectors' parameters and, for
  --select, every grid point's validation AUROC."""
  parts = [f"# {_md_escape(_title(results))}", ""]
  cl = _classifier_line(results)
  if cl:
    parts += [cl, ""]
  parts += ["## Summary (no outlier data, then outlier data; each by near-OOD AUROC, %)", "",
            _md_table(*_summary_rows(results, True)), "",
            "## Per OOD set (%)", "", _md_table(*_per_set_rows(results, True)), "",
            "## Detector parameters", "", _md_table(*_param_rows(results)), ""]
  if results.get("selection"):
    parts += ["## Hyper-parameter selection (ID val vs OOD val)", "",
              _md_table(*_selection_rows(results)), ""]
    for name, sel in results["selection"].items():
      header, rows, at = _grid_rows(sel)
      if not rows:
        continue
      if at is not None:
        rows[at] = [f"**{c}**" for c in rows[at]]
      parts += [f"### {_md_escape(name)}: grid ({len(rows)} points, chosen in bold)", "",
                _md_table(header, rows), ""]
  parts += [f"*{_md_escape(FPR_LEGEND)}*", "", f"*{_md_escape(AUPR_LEGEND)}*", "",
            f"*{_md_escape(OUTLIER_LEGEND)}*", ""]
  return "\n".join(parts)


# --------------------------------------------------------------------------- files




def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def write_json(results: Mapping, path) -> str:
  """Writes the results dict as indented JSON (numpy scalars / arrays converted)."""
  def write(f):
    text = io.TextIOWrapper(f, encoding="utf-8")
    json.dump(results, text, indent=2, default=_json_default)
    text.write("\n")
    text.flush()
    text.detach()
  return atomic_write(path, write)


CSV_FIELDS = ("detector", "set", "group", "metric", "value", "std")


def csv_rows(results: Mapping) -> list[dict]:
  """The long-format rows of `to_csv` (value / std as floats, std None when absent).

  Rows: the classifier accuracy (detector, set, group empty); each detector's accuracy and
  its outlier_data flag (1.0 = uses real outlier data; set, group empty); each per-set metric (set = the OOD set, group = its group); each group mean
  (set = "mean", group = "near" / "far").
  """
  rows = []
  def add(detector, set_name, group, metric, value, std):
    rows.append({"detector": detector, "set": set_name, "group": group, "metric": metric,
                 "value": float(value), "std": None if std is None else float(std)})
  if is_number(results.get("classifier_accuracy")):
    add("", "", "", "classifier_accuracy", results["classifier_accuracy"],
        results.get("classifier_accuracy_std"))
  for name in sorted_detectors(results):
    det = results["detectors"][name]
    if is_number(det.get("accuracy")):
      add(name, "", "", "accuracy", det["accuracy"], det.get("accuracy_std"))
    if "outlier_data" in det:
      add(name, "", "", "outlier_data", 1.0 if det["outlier_data"] else 0.0, None)
    for set_name, m in det.get("ood", {}).items():
      for k in METRICS:
        if k in m:
          add(name, set_name, m.get("group", ""), k, m[k], m.get("std", {}).get(k))
    for group, m in _groups_of(det).items():
      for k in METRICS:
        if k in m:
          add(name, "mean", group, k, m[k], m.get("std", {}).get(k))
  return rows


def to_csv(results: Mapping, path) -> str:
  """Long-format CSV: detector, set, group, metric, value, std (std empty when absent).

  Values are fractions in [0, 1] written with repr precision. See `csv_rows` for the rows.
  """
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
  w.writeheader()
  for r in csv_rows(results):
    w.writerow({**r, "value": repr(r["value"]),
                "std": "" if r["std"] is None else repr(r["std"])})
  return atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- plots


def _new_figure(figsize):
  from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
  return Figure(figsize=figsize, dpi=100, layout="constrained")


def _save_png(fig, path) -> str:
  return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _line_styles(n: int) -> list[dict]:
  """n distinguishable (colour, dash) pairs: tab10 colours, then the same with other dashes."""
  from matplotlib import colormaps
  colours = colormaps["tab10"].colors
  dashes = ["-", "--", ":", "-."]
  return [{"color": colours[i % 10], "ls": dashes[(i // 10) % 4]} for i in range(n)]


def plot_roc(curves: Mapping[str, Mapping[str, np.ndarray]], path,
             title: str | None = None) -> str:
  """ROC curves, one panel per OOD set, one line per detector (ID is the positive class).

  `curves` is {detector: {"id": scores, SET: scores, ...}}; every detector given is drawn
  (in the given order, which also orders the legends). Each panel's legend gives every
  detector's AUROC on that set.
  """
  sets = []
  for scores in curves.values():
    for s in scores:
      if s != "id" and s not in sets:
        sets.append(s)
  n = max(1, len(sets))
  cols = min(n, 3)
  rows = -(-n // cols)
  legend_h = 0.16 * len(curves)                  # room for one legend line per detector
  fig = _new_figure((4.4 * cols, max(3.8, 2.6 + legend_h) * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  styles = dict(zip(curves, _line_styles(len(curves))))
  for ax, set_name in zip(axes, sets):
    for det, scores in curves.items():
      if set_name not in scores:
        continue
      fpr, tpr, _ = _metrics.roc_curve(scores["id"], scores[set_name])
      auc = _metrics.auroc(scores["id"], scores[set_name])
      ax.plot(fpr, tpr, lw=1.3, label=f"{det} ({100 * auc:.1f})", **styles[det])
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_title(str(set_name))
    ax.set_xlabel("FPR (OOD accepted)")
    ax.set_ylabel("TPR (ID accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=6.5 if len(curves) > 6 else 7.5, loc="lower right", title="AUROC %",
              title_fontsize=7, framealpha=0.85)
  for ax in axes[len(sets):]:
    ax.set_axis_off()
  if title:
    fig.suptitle(title)
  return _save_png(fig, path)


def histogram_scale(arrays: Iterable[np.ndarray]) -> tuple[str, float | None]:
  """The x scale that shows these score distributions: ("linear", None), ("symlog", linthresh)
  or ("rank", None).

  Linear unless one set's middle half (its interquartile range) spans under 3 % of the pooled
  0.5-99.5 percentile range (it would be a spike). Then symlog when the pooled scores keep one
  sign and their magnitudes span more than two decades (GROOD's -(squared distance) in about
  [-0.035, 0]; linthresh = the pooled 2nd percentile of |score|), else ranks (each score's
  pooled percentile, 0-100).
  """
  arrays = [a[np.isfinite(a)] for a in (np.asarray(x, np.float64).ravel() for x in arrays)]
  arrays = [a for a in arrays if a.size]
  if not arrays:
    return "linear", None
  pooled = np.concatenate(arrays)
  lo, hi = np.percentile(pooled, [0.5, 99.5])
  span = hi - lo
  if not span > 0:
    return "linear", None
  squashed = any(np.subtract(*np.percentile(a, [75, 25])) < 0.03 * span
                 for a in arrays if a.size >= 8)
  if not squashed:
    return "linear", None
  mag = np.abs(pooled)
  one_sign = (pooled <= 0).all() or (pooled >= 0).all()
  nonzero = mag[mag > 0]
  if one_sign and nonzero.size:
    small, large = np.percentile(nonzero, [2, 99.5])
    if small > 0 and large / small > 100:
      return "symlog", float(small)
  return "rank", None


def _symlog(x, c):
  return np.sign(x) * np.log1p(np.abs(x) / c)


def _symlog_inv(y, c):
  return np.sign(y) * c * np.expm1(np.abs(y))


def plot_histograms(scores_by_set: Mapping[str, np.ndarray], path, title: str = "",
                    bins: int = 60, scale: str | None = None) -> str:
  """Score histograms (density, shared bins) of ID ("id") and each OOD set, for one detector.

  Non-finite scores are left out; the bins span the pooled 0.5-99.5 percentiles, with scores
  outside clipped into the edge bins. `scale` ("linear", "symlog", "rank"; default:
  `histogram_scale`) is named on the x axis.
  """
  arrays = {k: np.asarray(v, np.float64).ravel() for k, v in scores_by_set.items()}
  arrays = {k: a[np.isfinite(a)] for k, a in arrays.items()}
  linthresh = None
  if scale is None:
    scale, linthresh = histogram_scale(arrays.values())
  pooled = np.concatenate(list(arrays.values())) if arrays else np.zeros(0)
  if scale == "symlog" and linthresh is None:
    nz = np.abs(pooled[pooled != 0])
    linthresh = float(np.percentile(nz, 2)) if nz.size else 1.0
  if scale == "rank":
    ref = np.sort(pooled)
    def to_rank(a):
      return 100.0 * (np.searchsorted(ref, a, "left") + np.searchsorted(ref, a, "right")) / (
          2.0 * max(len(ref), 1))
    arrays = {k: to_rank(a) for k, a in arrays.items()}
    pooled = to_rank(pooled)
  # Range from the pooled 0.5 / 99.5 percentiles so a few outliers do not squash the plot;
  # scores beyond it are clipped into the edge bins.
  lo, hi = np.percentile(pooled, [0.5, 99.5]) if pooled.size else (0.0, 0.0)
  if scale == "rank":
    lo, hi = 0.0, 100.0
  if not hi > lo:
    lo, hi = (pooled.min(), pooled.max()) if pooled.size else (0.0, 0.0)
  if not hi > lo:
    lo, hi = lo - 0.5, hi + 0.5
  if scale == "symlog":
    edges = _symlog_inv(np.linspace(_symlog(lo, linthresh), _symlog(hi, linthresh), bins + 1),
                        linthresh)
  else:
    edges = np.linspace(lo, hi, bins + 1)
  fig = _new_figure((7.0, 4.0))
  ax = fig.subplots()
  order = (["id"] if "id" in arrays else []) + [k for k in arrays if k != "id"]
  styles = _line_styles(len(order))
  for i, k in enumerate(order):
    a = np.clip(arrays[k], lo, hi)
    if a.size == 0:
      continue
    is_id = k == "id"
    # density over the bin widths; with symlog bins, counts per bin would be as readable, but a
    # density keeps sets of different sizes comparable: use the fraction of the set per bin
    weights = np.full(a.size, 1.0 / a.size)
    ax.hist(a, bins=edges, weights=weights, histtype="stepfilled" if is_id else "step",
            alpha=0.35 if is_id else 1.0, lw=1.0 if is_id else 1.4,
            color="0.3" if is_id else styles[i]["color"],
            label=f"ID (n={a.size})" if is_id else f"{k} (n={a.size})")
  if scale == "symlog":
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlabel(f"score, symlog axis (linear within ±{linthresh:.2g}; higher = more ID)")
  elif scale == "rank":
    ax.set_xlabel("score rank: percentile among all plotted scores (higher = more ID)")
  else:
    ax.set_xlabel("score, linear axis (higher = more in-distribution)")
  ax.set_ylabel("fraction of the set per bin")
  if title:
    ax.set_title(title)
  ax.legend(fontsize=8)
  return _save_png(fig, path)


def plot_auroc_bars(results: Mapping, path) -> str:
  """Grouped bars of near- and far-OOD AUROC (%) per detector, sorted by near AUROC, with std
  error bars when present."""
  names = sorted_detectors(results)
  x = np.arange(len(names))
  width = 0.4
  fig = _new_figure((max(5.0, 0.8 * len(names) + 2.0), 4.2))
  ax = fig.subplots()
  for i, group in enumerate(GROUPS):
    vals, errs, has_err = [], [], False
    for name in names:
      g = _groups_of(results["detectors"][name]).get(group, {})
      vals.append(100.0 * g.get("auroc", np.nan))
      s = g.get("std", {}).get("auroc")
      has_err |= s is not None
      errs.append(100.0 * (s or 0.0))
    if all(np.isnan(vals)):
      continue
    ax.bar(x + (i - 0.5) * width, vals, width, yerr=errs if has_err else None, capsize=3,
           label=f"{group}-OOD")
  ax.set_xticks(x, names, rotation=35, ha="right")
  ax.set_ylabel("AUROC (%)")
  ax.set_ylim(0, 100)
  ax.axhline(50, color="0.6", lw=0.8, ls="--")
  ax.set_title(f"AUROC — {results.get('benchmark', '')}")
  ax.legend()
  return _save_png(fig, path)


# --------------------------------------------------------------------------- HTML


def _e(s) -> str:
  return html.escape(str(s), quote=True)


def _html_table(header: list[str], rows: list[list[str]], caption: str | None = None,
                highlight: int | None = None, group_start: int | None = None) -> str:
  attrs = [' class="num"' if _numeric_column(h) else "" for h in header]
  out = ["<table>"]
  if caption:
    out.append(f"<caption>{_e(caption)}</caption>")
  out.append("<thead><tr>" + "".join(f"<th{a}>{_e(h)}</th>" for h, a in zip(header, attrs))
             + "</tr></thead>")
  out.append("<tbody>")
  for i, r in enumerate(rows):
    cls = " ".join(c for c, on in (("chosen", i == highlight),
                                   ("group-start", i == group_start)) if on)
    tr = f'<tr class="{cls}">' if cls else "<tr>"
    out.append(tr + "".join(f"<td{a}>{_e(v)}</td>" for v, a in zip(r, attrs)) + "</tr>")
  out.append("</tbody></table>")
  return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f0f0f0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.3em 0}
figure{margin:1em 0}
img{max-width:100%}
.legend{color:#555;font-size:.9em}
pre{background:#f7f7f7;padding:.6em;overflow:auto}
tr.chosen td{font-weight:700;background:#eef6ee}
tr.group-start td{border-top:3px solid #555}
table.kv th{text-align:left;vertical-align:top}
details{margin:.6em 0}
summary{cursor:pointer;font-weight:600}
"""


def _image_figure(path, caption: str | None = None) -> str:
  with open(path, "rb") as f:
    data = f.read()
  b64 = base64.b64encode(data).decode("ascii")
  name = os.path.basename(os.fspath(path))
  text = f"{name}: {caption}" if caption else name
  return (f'<figure id="fig-{_e(name)}"><img src="data:image/png;base64,{b64}" alt="{_e(name)}">'
          f"<figcaption>{_e(text)}</figcaption></figure>")


def _kv_table(pairs: Iterable[tuple[str, str]], caption: str | None = None) -> str:
  out = ['<table class="kv">']
  if caption:
    out.append(f"<caption>{_e(caption)}</caption>")
  out += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs]
  out.append("</table>")
  return "\n".join(out)


def _provenance_html(prov: Mapping) -> str:
  """The provenance block: how this report was made (command, versions, device, date, git
  commit) and each checkpoint's training config."""
  versions = prov.get("versions", {}) or {}
  git = prov.get("git") or {}
  git_text = "-"
  if git.get("commit"):
    git_text = git["commit"] + (" (uncommitted changes)" if git.get("dirty") else "")
  dev = prov.get("device", {}) or {}
  dev_text = ", ".join(f"{k}={v}" for k, v in dev.items()) or "-"
  pairs = [("Command", prov.get("command", "-")), ("Working directory", prov.get("cwd", "-")),
           ("Date (UTC)", prov.get("date", "-")), ("Host", prov.get("host", "-")),
           ("Device", dev_text), ("grood_jax git commit", git_text)]
  pairs += [(f"{k} version", v) for k, v in versions.items()]
  parts = ['<section id="provenance"><h2>Provenance</h2>', _kv_table(pairs)]
  for ck in prov.get("checkpoints", []) or []:
    head = f"{ck.get('path', '?')} (step {ck.get('step', '?')})"
    parts.append(f'<details class="config"><summary>Training config of {_e(head)}</summary>'
                 f"<pre>{_e(json.dumps(ck.get('config', {}), indent=2, sort_keys=True, default=_json_default))}</pre>"
                 "</details>")
  parts.append("</section>")
  return "\n".join(parts)


def to_html(results: Mapping, images: Iterable = (), provenance: Mapping | None = None,
            timing: Mapping | None = None) -> str:
  """One self-contained HTML5 page: the tables (AUROC, AUPR-In/Out, FPR95), each detector's
  parameters, the selection grid with every point's val AUROC, the plots embedded as base64
  PNG (`images`: paths, or (path, caption) pairs), provenance and timing."""
  title = _title(results)
  body = [f"<h1>{_e(title)}</h1>"]
  cl = _classifier_line(results)
  if cl:
    body.append(f"<p>{_e(cl)}</p>")
  body.append('<section id="summary">')
  order = sorted_detectors(results)
  first_oe = next((i for i, n in enumerate(order) if uses_outlier_data(results, n)), None)
  body.append(_html_table(*_summary_rows(results, True), group_start=first_oe or None,
                          caption="Summary: detectors without outlier data, then with; each group "
                                  "sorted by near-OOD AUROC (%)"))
  body.append(f'<p class="legend">{_e(FPR_LEGEND)}<br>{_e(AUPR_LEGEND)}<br>'
              f'{_e(OUTLIER_LEGEND)}</p></section>')
  body.append('<section id="per-set">')
  body.append(_html_table(*_per_set_rows(results, True), caption="Per OOD set (%)"))
  body.append("</section>")
  body.append('<section id="parameters"><h2>Detector parameters</h2>')
  body.append(_html_table(*_param_rows(results)))
  body.append("</section>")
  if results.get("selection"):
    body.append('<section id="selection"><h2>Hyper-parameter selection (ID val vs OOD val)</h2>')
    body.append(_html_table(*_selection_rows(results), caption="Chosen settings"))
    for name, sel in results["selection"].items():
      header, rows, at = _grid_rows(sel)
      if not rows:
        continue
      table = _html_table(header, rows, highlight=at)
      body.append(f'<details class="grid" open data-detector="{_e(name)}"><summary>{_e(name)}: '
                  f"grid of {len(rows)} point{'s' if len(rows) != 1 else ''} (val AUROC %; the "
                  "chosen one in bold)</summary>"
                  f"{table}</details>")
    body.append("</section>")
  images = [(p, None) if isinstance(p, (str, os.PathLike)) else tuple(p) for p in images]
  if images:
    body.append('<section id="plots"><h2>Plots</h2>')
    body += [_image_figure(p, c) for p, c in images]
    body.append("</section>")
  if provenance:
    body.append(_provenance_html(provenance))
  extra = {"timing": timing} if timing else {}
  for key in ("meta", "meta_per_run"):
    if key in results:
      extra[key] = results[key]
  for key, value in extra.items():
    text = json.dumps(value, indent=2, default=_json_default)
    body.append(f'<details class="{_e(key)}"><summary>{_e(key)}</summary><pre>{_e(text)}</pre>'
                "</details>")
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
          + "\n".join(body) + "\n</body>\n</html>\n")


def write_html(results: Mapping, path, images: Iterable = (), provenance: Mapping | None = None,
               timing: Mapping | None = None) -> str:
  """Writes `to_html(...)` to `path` (atomically); returns the path."""
  return atomic_write_text(path, to_html(results, images, provenance, timing))


# --------------------------------------------------------------------------- scores.npz


def write_scores(path, score_runs: list[Mapping], *, checkpoints=(), groups: Mapping | None = None,
                 id_labels=None) -> str:
  """Per-sample scores of every detector and set, as an .npz (no pickles):

    schema_version     int
    detectors          str (D,)   detector labels as in results.json ("grood[default]", ...)
    sets               str (S,)   "id" (the ID test split) first, then the OOD sets
    checkpoints        str (R,)   one per scored checkpoint (run)
    group/<set>        str        "id", "near" or "far"
    ids/<set>          int64 (N,) each sample's row in its set as loaded (after --max-per-set)
    labels/id          int32 (N,) ID test labels
    scores/<det>/<set> float64 (R, N)  higher = more in-distribution; row r = checkpoint r

  results.json's metrics are `stats.metrics_from_scores(scores/<det>/id[r], scores/<det>/<set>[r])`.
  """
  runs = list(score_runs)
  dets = list(runs[0])
  sets: list[str] = []
  for by_set in runs[0].values():
    for s in by_set:
      if s not in sets:
        sets.append(s)
  sets.sort(key=lambda s: s != "id")
  arrays = {"schema_version": np.asarray(SCHEMA_VERSION), "detectors": np.asarray(dets, str),
            "sets": np.asarray(sets, str),
            "checkpoints": np.asarray([str(c) for c in checkpoints] or [""] * len(runs), str)}
  groups = dict(groups or {})
  for s in sets:
    arrays[f"group/{s}"] = np.asarray("id" if s == "id" else groups.get(s, ""), str)
  for d in dets:
    for s in runs[0][d]:
      rows = [np.asarray(r[d][s], np.float64) for r in runs]
      arrays[f"scores/{d}/{s}"] = np.stack(rows)
      arrays.setdefault(f"ids/{s}", np.arange(len(rows[0]), dtype=np.int64))
  if id_labels is not None:
    arrays["labels/id"] = np.asarray(id_labels, np.int32)
  return atomic_write(path, lambda f: np.savez(f, **arrays))


# --------------------------------------------------------------------------- all at once


def _safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "detector"


CACHE_DIR = "cache"
LOCK_FILE = ".grood.lock"
_OURS = re.compile(r"^(results\.(json|csv|md)|report\.html|scores\.npz|provenance\.json|"
                   r"timing\.json|roc\.png|auroc_bars\.png|hist_[A-Za-z0-9_.-]*\.png|cache|"
                   r"\.grood\.lock|\..*\.tmp)$")


def foreign_entries(out_dir) -> list[str]:
  """Names in an existing report directory that no report wrote (the directory is swapped
  whole, so a report directory must hold only report files). [] when it does not exist."""
  try:
    names = os.listdir(out_dir)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(n for n in names if not _OURS.match(n))


def _sibling_prefix(out_dir: str) -> str:
  return "." + os.path.basename(out_dir) + ".report-"


def clean_stale(out_dir) -> list[str]:
  """Removes temporary report directories a killed run left beside `out_dir` (call it while
  holding the --out lock); a feature cache found there is moved back when `out_dir` has none.
  Returns the removed paths."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent, prefix = os.path.dirname(out_dir), _sibling_prefix(out_dir)
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for n in sorted(names):
    if not n.startswith(prefix):
      continue
    p = os.path.join(parent, n)
    cache = os.path.join(p, CACHE_DIR)
    if os.path.isdir(cache) and os.path.isdir(out_dir) and not os.path.exists(
        os.path.join(out_dir, CACHE_DIR)):
      os.rename(cache, os.path.join(out_dir, CACHE_DIR))
    shutil.rmtree(p, ignore_errors=True)
    removed.append(p)
  return removed


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  at_fdcwd = -100
  if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(err, os.strerror(err), a)


def _swap_in(tmp: str, out_dir: str) -> None:
  """Makes `tmp` the report directory `out_dir`: the lock file (hard link: the same locked
  inode) and the feature cache move along; the old directory is then removed."""
  if not os.path.isdir(out_dir):
    os.rename(tmp, out_dir)
    return
  lock = os.path.join(out_dir, LOCK_FILE)
  if os.path.exists(lock):
    os.link(lock, os.path.join(tmp, LOCK_FILE))
  cache = os.path.join(out_dir, CACHE_DIR)
  if os.path.isdir(cache):
    os.rename(cache, os.path.join(tmp, CACHE_DIR))
  if _exchange(tmp, out_dir):
    old = tmp                                    # the old report now lives at tmp's path
  else:                                          # two renames: never a mixed directory
    old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=_sibling_prefix(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
  shutil.rmtree(old, ignore_errors=True)


def write_report(results: Mapping, out_dir, scores: Mapping | None = None, *,
                 plots: bool = True, score_runs: list[Mapping] | None = None,
                 checkpoints=(), id_labels=None, provenance: Mapping | None = None,
                 timing: Mapping | None = None) -> list[str]:
  """Writes the whole report and returns the paths written (under out_dir).

  Files: results.json (deterministic: the same inputs give the same bytes), results.csv,
  results.md; scores.npz (`write_scores`; `score_runs` = one {detector: {set: scores}} per
  checkpoint, default [scores]); provenance.json and timing.json when given (not
  reproducible, so kept out of results.json); with `plots`: roc.png (every detector),
  hist_<detector>.png per detector, auroc_bars.png; and report.html (plots embedded,
  provenance). Everything is written into a temporary directory beside out_dir, which then
  replaces out_dir whole (its feature cache and lock file move along): a failure or a kill
  mid-way leaves the previous report complete. An OSError (disk full, ...) becomes an
  OutputError saying so.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent = os.path.dirname(out_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=_sibling_prefix(out_dir))
  except OSError as e:
    raise OutputError(f"cannot create the report beside {out_dir} ({e.strerror or e}); choose "
                      "another --out") from None
  try:
    names = _write_files(results, tmp, scores, plots=plots, score_runs=score_runs,
                         checkpoints=checkpoints, id_labels=id_labels, provenance=provenance,
                         timing=timing)
    os.chmod(tmp, 0o777 & ~_umask())
    _swap_in(tmp, out_dir)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    what = e.strerror or str(e)
    hint = ("free some disk space, or choose another --out"
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose another --out")
    raise OutputError(f"cannot write the report into {out_dir}: {what} "
                      f"[errno {e.errno}]; {hint}; the previous report (if any) is intact") from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return [os.path.join(out_dir, n) for n in names]


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _write_files(results, out_dir, scores, *, plots, score_runs, checkpoints, id_labels,
                 provenance, timing) -> list[str]:
  j = lambda name: os.path.join(out_dir, name)  # noqa: E731
  if "schema_version" not in results:
    results = {"schema_version": SCHEMA_VERSION, **results}
  written = [write_json(results, j("results.json")), to_csv(results, j("results.csv")),
             atomic_write_text(j("results.md"), to_markdown(results))]
  runs = score_runs if score_runs is not None else ([scores] if scores else [])
  if runs:
    groups = {s: m.get("group", "") for det in results.get("detectors", {}).values()
              for s, m in det.get("ood", {}).items()}
    written.append(write_scores(j("scores.npz"), runs, checkpoints=checkpoints, groups=groups,
                                id_labels=id_labels))
  if provenance:
    written.append(write_json(provenance, j("provenance.json")))
  if timing:
    written.append(write_json(timing, j("timing.json")))
  images: list[tuple[str, str]] = []
  if plots and results.get("detectors"):
    images.append((plot_auroc_bars(results, j("auroc_bars.png")),
                   "near- and far-OOD AUROC per detector"))
  if plots and scores:
    order = [n for n in sorted_detectors(results) if n in scores]
    order += [n for n in scores if n not in order]
    images.append((plot_roc({n: scores[n] for n in order}, j("roc.png"),
                            title=f"ROC — {results.get('benchmark', '')}"),
                   f"ROC curves of all {len(order)} detectors on every OOD set "
                   "(legend: AUROC %, detectors by near-OOD AUROC)"))
    used = set()
    for name in order:
      by_set = scores[name]
      fname = f"hist_{_safe_name(name)}.png"
      k = 2
      while fname in used:
        fname = f"hist_{_safe_name(name)}_{k}.png"
        k += 1
      used.add(fname)
      scale, _ = histogram_scale(by_set.values())
      title = f"{name} — {results.get('benchmark', '')}"
      images.append((plot_histograms(by_set, j(fname), title=title),
                     f"score histograms of {name} ({scale} x axis)"))
  written += [p for p, _ in images]
  written.append(write_html(results, j("report.html"), images, provenance, timing))
  return [os.path.basename(p) for p in written]
