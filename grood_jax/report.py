"""Benchmark reports: tables (terminal, Markdown, HTML), CSV, JSON and plots.

A results dict has this schema (all metrics are fractions in [0, 1]):

  {"benchmark": str, "checkpoint": str | list[str], "classifier_accuracy": float,
   "detectors": {NAME: {"params": {...}, "accuracy": float,
                        "ood": {SET: {"group": "near" | "far", "auroc", "aupr_in", "aupr_out",
                                      "fpr95", "fpr95_openood"}},
                        "near": {five metrics, unweighted means over the near sets},
                        "far": {same over the far sets}}},
   "selection": {NAME: {"chosen": {...}, "grid": [{"params": {...}, "auroc": float}, ...]}},
   "timing": {...}, "meta": {...}}        # the last three optional

When several checkpoints were scored (`aggregate_runs`), every metric dict also carries
"std": {metric: value} beside the means, and the detector / top level carry `accuracy_std` /
`classifier_accuracy_std`.

FPR@95 conventions, named everywhere: "FPR95" is the classic one (fraction of OOD accepted when
95 % of ID is accepted); "FPR95-OO" is OpenOOD v1.5's (fraction of ID rejected when 95 % of OOD
is caught). See grood_jax.metrics.

Every file is written atomically (temporary file in the same directory, then os.replace), so a
crash mid-way leaves the previous version of each file intact.
"""

from __future__ import annotations

import base64
import copy
import csv
import html
import io
import json
import math
import os
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from grood_jax.fileio import atomic_write, atomic_write_text

from grood_jax import metrics as _metrics

METRICS = _metrics.METRIC_NAMES
GROUPS = ("near", "far")
FPR_LEGEND = ("FPR95 = classic FPR@95 (fraction of OOD accepted when 95% of ID is accepted); "
              "FPR95-OO = OpenOOD v1.5 FPR@95 (fraction of ID rejected when 95% of OOD is caught)")
_HEADER_NAMES = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out",
                 "fpr95": "FPR95", "fpr95_openood": "FPR95-OO"}


# --------------------------------------------------------------------------- aggregation


def _is_number(x) -> bool:
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
    if _is_number(value):
      missing = [i for i, d in enumerate(dicts) if not _is_number(d.get(key))]
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
  if all(_is_number(r.get("classifier_accuracy")) for r in runs):
    accs = [float(r["classifier_accuracy"]) for r in runs]
    out["classifier_accuracy"] = float(np.mean(accs))
    out["classifier_accuracy_std"] = _std(accs)

  detectors = {}
  for name, det0 in first["detectors"].items():
    dets = [r["detectors"][name] for r in runs]
    agg = {"params": copy.deepcopy(det0.get("params", {}))}
    if any(d.get("params", {}) != det0.get("params", {}) for d in dets):
      agg["params_per_run"] = [copy.deepcopy(d.get("params", {})) for d in dets]
    if all(_is_number(d.get("accuracy")) for d in dets):
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


def sorted_detectors(results: Mapping) -> list[str]:
  """Detector names by near-OOD AUROC, descending (then far AUROC, then name)."""
  def key(name):
    groups = _groups_of(results["detectors"][name])
    near = groups.get("near", {}).get("auroc")
    far = groups.get("far", {}).get("auroc")
    near = -math.inf if near is None or not math.isfinite(near) else float(near)
    far = -math.inf if far is None or not math.isfinite(far) else float(far)
    return (-near, -far, name)
  return sorted(results.get("detectors", {}), key=key)


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


def _summary_rows(results: Mapping, openood: bool) -> tuple[list[str], list[list[str]]]:
  header = ["Detector", "Near AUROC", "Far AUROC", "Near FPR95", "Far FPR95"]
  if openood:
    header += ["Near FPR95-OO", "Far FPR95-OO"]
  header += ["Accuracy"]
  rows = []
  for name in sorted_detectors(results):
    det = results["detectors"][name]
    g = _groups_of(det)
    row = [name, _cell(g.get("near"), "auroc"), _cell(g.get("far"), "auroc"),
           _cell(g.get("near"), "fpr95"), _cell(g.get("far"), "fpr95")]
    if openood:
      row += [_cell(g.get("near"), "fpr95_openood"), _cell(g.get("far"), "fpr95_openood")]
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
  header = ["Set", "Group", "Detector", "AUROC", "FPR95"]
  if openood:
    header += ["FPR95-OO"]
  order = sorted_detectors(results)
  rows = []
  for set_name, group in _ordered_sets(results):
    for name in order:
      m = results["detectors"][name].get("ood", {}).get(set_name)
      if m is None:
        continue
      row = [set_name, group, name, _cell(m, "auroc"), _cell(m, "fpr95")]
      if openood:
        row += [_cell(m, "fpr95_openood")]
      rows.append(row)
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
    aurocs = [g["auroc"] for g in grid if _is_number(g.get("auroc"))]
    best = _pct(max(aurocs)) if aurocs else "-"
    rows.append([name, _params_text(sel.get("chosen", {})), str(len(grid)), best])
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
  return any(t in name for t in ("AUROC", "FPR95", "Accuracy", "AUPR", "size"))


def _title(results: Mapping) -> str:
  return f"{results.get('benchmark', '?')} — {_checkpoint_text(results)}"


def _classifier_line(results: Mapping) -> str | None:
  acc = results.get("classifier_accuracy")
  if acc is None:
    return None
  return f"Classifier accuracy: {_pct(acc, results.get('classifier_accuracy_std'))} %"


def format_table(results: Mapping, openood_fpr: bool = False) -> str:
  """Terminal tables: the summary (sorted by near-OOD AUROC, descending) and the per-set table.

  Values in %, 2 decimals, "± s" when a std is present. The classic FPR@95 is shown as "FPR95";
  pass openood_fpr=True to add OpenOOD's convention ("FPR95-OO") as extra columns.
  """
  lines = [f"Benchmark: {results.get('benchmark', '?')}",
           f"Checkpoint: {_checkpoint_text(results)}"]
  cl = _classifier_line(results)
  if cl:
    lines.append(cl)
  lines += ["", _text_table(*_summary_rows(results, openood_fpr)), "",
            "Per OOD set:", _text_table(*_per_set_rows(results, openood_fpr)), "", FPR_LEGEND]
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


def to_markdown(results: Mapping) -> str:
  """The same tables in Markdown, with both FPR@95 conventions as columns."""
  parts = [f"# {_md_escape(_title(results))}", ""]
  cl = _classifier_line(results)
  if cl:
    parts += [cl, ""]
  parts += ["## Summary (sorted by near-OOD AUROC, %)", "",
            _md_table(*_summary_rows(results, True)), "",
            "## Per OOD set (%)", "", _md_table(*_per_set_rows(results, True)), ""]
  if results.get("selection"):
    parts += ["## Hyper-parameter selection (ID val vs OOD val)", "",
              _md_table(*_selection_rows(results)), ""]
  parts += [f"*{_md_escape(FPR_LEGEND)}*", ""]
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

  Rows: the classifier accuracy (detector, set, group empty); each detector's accuracy (set,
  group empty); each per-set metric (set = the OOD set, group = its group); each group mean
  (set = "mean", group = "near" / "far").
  """
  rows = []
  def add(detector, set_name, group, metric, value, std):
    rows.append({"detector": detector, "set": set_name, "group": group, "metric": metric,
                 "value": float(value), "std": None if std is None else float(std)})
  if _is_number(results.get("classifier_accuracy")):
    add("", "", "", "classifier_accuracy", results["classifier_accuracy"],
        results.get("classifier_accuracy_std"))
  for name in sorted_detectors(results):
    det = results["detectors"][name]
    if _is_number(det.get("accuracy")):
      add(name, "", "", "accuracy", det["accuracy"], det.get("accuracy_std"))
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


def plot_roc(curves: Mapping[str, Mapping[str, np.ndarray]], path,
             title: str | None = None) -> str:
  """ROC curves, one panel per OOD set, one line per detector (ID is the positive class).

  `curves` is {detector: {"id": scores, SET: scores, ...}}; pass the detectors to show (e.g.
  the top 3). The legend gives each detector's AUROC on that set.
  """
  sets = []
  for scores in curves.values():
    for s in scores:
      if s != "id" and s not in sets:
        sets.append(s)
  n = max(1, len(sets))
  cols = min(n, 3)
  rows = -(-n // cols)
  fig = _new_figure((4.0 * cols, 3.6 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, set_name in zip(axes, sets):
    for det, scores in curves.items():
      if set_name not in scores:
        continue
      fpr, tpr, _ = _metrics.roc_curve(scores["id"], scores[set_name])
      auc = _metrics.auroc(scores["id"], scores[set_name])
      ax.plot(fpr, tpr, lw=1.4, label=f"{det} ({100 * auc:.1f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_title(str(set_name))
    ax.set_xlabel("FPR (OOD accepted)")
    ax.set_ylabel("TPR (ID accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right", title="AUROC %", title_fontsize=7)
  for ax in axes[len(sets):]:
    ax.set_axis_off()
  if title:
    fig.suptitle(title)
  return _save_png(fig, path)


def plot_histograms(scores_by_set: Mapping[str, np.ndarray], path, title: str = "",
                    bins: int = 60) -> str:
  """Score histograms (density, shared bins) of ID ("id") and each OOD set, for one detector.

  Non-finite scores are left out; the bins span the pooled 0.5-99.5 percentiles, with scores
  outside clipped into the edge bins.
  """
  arrays = {k: np.asarray(v, np.float64).ravel() for k, v in scores_by_set.items()}
  finite = [a[np.isfinite(a)] for a in arrays.values()]
  finite = np.concatenate(finite) if finite else np.zeros(0)
  # Range from the pooled 0.5 / 99.5 percentiles so a few outliers do not squash the plot;
  # scores beyond it are clipped into the edge bins.
  lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 0.0)
  if not hi > lo:
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
  if not hi > lo:
    lo, hi = lo - 0.5, hi + 0.5
  edges = np.linspace(lo, hi, bins + 1)
  fig = _new_figure((7.0, 4.0))
  ax = fig.subplots()
  order = (["id"] if "id" in arrays else []) + [k for k in arrays if k != "id"]
  for k in order:
    a = arrays[k]
    a = np.clip(a[np.isfinite(a)], lo, hi)
    if a.size == 0:
      continue
    is_id = k == "id"
    ax.hist(a, bins=edges, density=True, histtype="stepfilled" if is_id else "step",
            alpha=0.35 if is_id else 1.0, lw=1.0 if is_id else 1.4,
            color="0.3" if is_id else None, label=f"ID (n={a.size})" if is_id else
            f"{k} (n={a.size})")
  ax.set_xlabel("score (higher = more in-distribution)")
  ax.set_ylabel("density")
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


def _html_table(header: list[str], rows: list[list[str]], caption: str | None = None) -> str:
  attrs = [' class="num"' if _numeric_column(h) else "" for h in header]
  out = ["<table>"]
  if caption:
    out.append(f"<caption>{_e(caption)}</caption>")
  out.append("<thead><tr>" + "".join(f"<th{a}>{_e(h)}</th>" for h, a in zip(header, attrs))
             + "</tr></thead>")
  out.append("<tbody>")
  for r in rows:
    out.append("<tr>" + "".join(f"<td{a}>{_e(v)}</td>" for v, a in zip(r, attrs)) + "</tr>")
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
"""


def _image_figure(path) -> str:
  with open(path, "rb") as f:
    data = f.read()
  b64 = base64.b64encode(data).decode("ascii")
  name = os.path.basename(os.fspath(path))
  return (f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(name)}">'
          f"<figcaption>{_e(name)}</figcaption></figure>")


def to_html(results: Mapping, images: Iterable = ()) -> str:
  """One self-contained HTML5 page: tables, selection, plots embedded as base64 PNG."""
  title = _title(results)
  body = [f"<h1>{_e(title)}</h1>"]
  cl = _classifier_line(results)
  if cl:
    body.append(f"<p>{_e(cl)}</p>")
  body.append(_html_table(*_summary_rows(results, True),
                          caption="Summary, sorted by near-OOD AUROC (%)"))
  body.append(f'<p class="legend">{_e(FPR_LEGEND)}</p>')
  body.append(_html_table(*_per_set_rows(results, True), caption="Per OOD set (%)"))
  if results.get("selection"):
    body.append("<h2>Hyper-parameter selection (ID val vs OOD val)</h2>")
    body.append(_html_table(*_selection_rows(results), caption="Chosen settings"))
    for name, sel in results["selection"].items():
      grid = sel.get("grid", []) or []
      if not grid:
        continue
      rows = [[_params_text(g.get("params", {})),
               _pct(g["auroc"]) if _is_number(g.get("auroc")) else "-"] for g in grid]
      body.append(f"<details><summary>{_e(name)}: grid ({len(grid)})</summary>"
                  + _html_table(["Params", "Val AUROC"], rows) + "</details>")
  images = list(images)
  if images:
    body.append("<h2>Plots</h2>")
    body += [_image_figure(p) for p in images]
  for key in ("timing", "meta", "timing_per_run", "meta_per_run"):
    if key in results:
      text = json.dumps(results[key], indent=2, default=_json_default)
      body.append(f"<h2>{_e(key)}</h2><pre>{_e(text)}</pre>")
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
          + "\n".join(body) + "\n</body>\n</html>\n")


def write_html(results: Mapping, path, images: Iterable = ()) -> str:
  """Writes `to_html(results, images)` to `path` (atomically); returns the path."""
  return atomic_write_text(path, to_html(results, images))


# --------------------------------------------------------------------------- all at once


def _safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "detector"


def write_report(results: Mapping, out_dir, scores: Mapping | None = None) -> list[str]:
  """Writes the whole report into out_dir and returns the paths written.

  Files: results.json, results.csv, results.md, and — when `scores`
  ({detector: {"id": array, SET: array, ...}}) is given — roc.png (top-3 detectors by near-OOD
  AUROC that have scores) and hist_<detector>.png per detector; then auroc_bars.png and
  report.html (with every plot embedded). Each file is replaced atomically.
  """
  out_dir = os.fspath(out_dir)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create report directory {out_dir!r}: {e}") from e
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise PermissionError(f"report directory {out_dir!r} is not writable")
  j = lambda name: os.path.join(out_dir, name)
  paths = [write_json(results, j("results.json")), to_csv(results, j("results.csv")),
           atomic_write_text(j("results.md"), to_markdown(results))]
  images = []
  if scores:
    top = [n for n in sorted_detectors(results) if n in scores][:3]
    top += [n for n in scores if n not in results.get("detectors", {})][:3 - len(top)]
    if top:
      images.append(plot_roc({n: scores[n] for n in top}, j("roc.png"),
                             title=f"ROC — {results.get('benchmark', '')}"))
    used = set()
    for name, by_set in scores.items():
      fname = f"hist_{_safe_name(name)}.png"
      k = 2
      while fname in used:
        fname = f"hist_{_safe_name(name)}_{k}.png"
        k += 1
      used.add(fname)
      title = f"{name} — {results.get('benchmark', '')}"
      images.append(plot_histograms(by_set, j(fname), title=title))
  if results.get("detectors"):
    images.insert(0, plot_auroc_bars(results, j("auroc_bars.png")))
  paths += images
  paths.append(write_html(results, j("report.html"), images))
  return paths
