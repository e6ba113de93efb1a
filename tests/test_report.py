"""Report: aggregation, tables, CSV / JSON / HTML files, plots and atomic writes."""

import base64
import csv
import html.parser
import json
import os

import numpy as np
import pytest

from grood_jax import metrics as M
from grood_jax import report as R
from grood_jax import stats as S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETS = {"cifar100": "near", "tin": "near", "mnist": "far", "svhn": "far", "textures": "far"}


def _scores(seed, shift):
  rng = np.random.default_rng(seed)
  out = {"id": rng.normal(shift, 1.0, 200)}
  for i, s in enumerate(SETS):
    out[s] = rng.normal(0.3 * i if SETS[s] == "far" else 0.0, 1.0, 150)
  return out


def _results(seed=0, checkpoint="ckpt/a"):
  """A results dict computed from synthetic scores for three detectors."""
  rng = np.random.default_rng(seed)
  detectors, scores = {}, {}
  for name, shift in [("msp", 1.0), ("grood <x>", 2.0), ("energy", 0.5)]:
    sc = _scores(seed * 10 + len(name), shift)
    scores[name] = sc
    ood = {s: {"group": g, **M.ood_metrics(sc["id"], sc[s])} for s, g in SETS.items()}
    detectors[name] = {"params": {"T": 1.0}, "accuracy": float(rng.uniform(0.9, 0.95)),
                       "ood": ood, **S.group_means(ood)}
  results = {"benchmark": "cifar10", "checkpoint": checkpoint,
             "classifier_accuracy": float(rng.uniform(0.9, 0.95)), "detectors": detectors,
             "selection": {"grood <x>": {"chosen": {"k": 5},
                                         "grid": [{"params": {"k": 1}, "auroc": 0.8},
                                                  {"params": {"k": 5}, "auroc": 0.85}]}},
             "timing": {"fit_s": 1.5}}
  return results, scores


def test_group_means_vs_numpy():
  res, _ = _results()
  ood = res["detectors"]["msp"]["ood"]
  g = S.group_means(ood)
  for group in ("near", "far"):
    names = [s for s, grp in SETS.items() if grp == group]
    for k in M.METRIC_NAMES:
      assert g[group][k] == pytest.approx(np.mean([ood[s][k] for s in names]))
  only_far = {s: m for s, m in ood.items() if m["group"] == "far"}
  assert set(S.group_means(only_far)) == {"far"}


def test_aggregate_runs_mean_std_vs_numpy():
  runs = [_results(seed, f"ckpt/{seed}")[0] for seed in range(3)]
  agg = S.aggregate_runs(runs)
  assert agg["checkpoint"] == ["ckpt/0", "ckpt/1", "ckpt/2"]
  assert agg["n_runs"] == 3
  acc = [r["classifier_accuracy"] for r in runs]
  assert agg["classifier_accuracy"] == pytest.approx(np.mean(acc))
  assert agg["classifier_accuracy_std"] == pytest.approx(np.std(acc, ddof=1))
  for det in runs[0]["detectors"]:
    a = agg["detectors"][det]
    vals = [r["detectors"][det]["accuracy"] for r in runs]
    assert a["accuracy"] == pytest.approx(np.mean(vals))
    assert a["accuracy_std"] == pytest.approx(np.std(vals, ddof=1))
    for s in SETS:
      assert a["ood"][s]["group"] == SETS[s]
      for k in M.METRIC_NAMES:
        vals = [r["detectors"][det]["ood"][s][k] for r in runs]
        assert a["ood"][s][k] == pytest.approx(np.mean(vals))
        assert a["ood"][s]["std"][k] == pytest.approx(np.std(vals, ddof=1))
    for group in ("near", "far"):
      for k in M.METRIC_NAMES:
        vals = [r["detectors"][det][group][k] for r in runs]
        assert a[group][k] == pytest.approx(np.mean(vals))
        assert a[group]["std"][k] == pytest.approx(np.std(vals, ddof=1))
        # Mean of group means == group mean of per-set means.
        assert a[group][k] == pytest.approx(S.group_means(a["ood"])[group][k])
  assert agg["timing_per_run"] == [{"fit_s": 1.5}] * 3
  single = S.aggregate_runs(runs[:1])
  assert single["detectors"]["msp"]["near"]["std"]["auroc"] == 0.0
  with pytest.raises(ValueError, match="detectors"):
    bad = json.loads(json.dumps(runs[1]))
    del bad["detectors"]["msp"]
    S.aggregate_runs([runs[0], bad])


def test_format_table_sorted_by_near_auroc():
  res, _ = _results()
  order = R.sorted_detectors(res)
  nears = [res["detectors"][n]["near"]["auroc"] for n in order]
  assert nears == sorted(nears, reverse=True)
  text = R.format_table(res)
  lines = text.splitlines()
  header = next(i for i, l in enumerate(lines) if l.startswith("Detector"))
  assert "Near AUROC" in lines[header] and "Near FPR95" in lines[header]
  rows = [lines[header + 2 + i].split("  ")[0].strip() for i in range(len(order))]
  assert rows == order
  best = res["detectors"][order[0]]
  assert f"{100 * best['near']['auroc']:.2f}" in lines[header + 2]
  assert f"{100 * best['accuracy']:.2f}" in lines[header + 2]
  assert "FPR95-OO" in text and "classic" in text  # the legend names both conventions
  assert "Per OOD set" in text and "textures" in text
  # With std: "± s".
  agg = S.aggregate_runs([_results(s, str(s))[0] for s in range(2)])
  assert "±" in R.format_table(agg)
  assert "FPR95-OO" in R.format_table(res, openood_fpr=True).splitlines()[header]


def test_markdown_names_both_conventions():
  res, _ = _results()
  md = R.to_markdown(res)
  assert "| Near FPR95 |" in md and "| Near FPR95-OO |" in md
  assert "grood &lt;x&gt;" in md and "<x>" not in md  # no raw HTML in Markdown
  assert "Hyper-parameter selection" in md
  assert md.index("| grood &lt;x&gt;") < md.index("| msp")


def test_csv_round_trip(tmp_path):
  runs = [_results(s, str(s))[0] for s in range(2)]
  for res in (runs[0], S.aggregate_runs(runs)):
    path = R.to_csv(res, tmp_path / "r.csv")
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == R.CSV_FIELDS
    expected = R.csv_rows(res)
    assert len(rows) == len(expected)
    for got, exp in zip(rows, expected):
      for k in ("detector", "set", "group", "metric"):
        assert got[k] == exp[k]
      assert float(got["value"]) == exp["value"]
      assert (got["std"] == "") if exp["std"] is None else float(got["std"]) == exp["std"]
    # Spot check against the dict.
    lookup = {(r["detector"], r["set"], r["metric"]): r for r in rows}
    det = res["detectors"]["msp"]
    assert float(lookup[("msp", "svhn", "fpr95")]["value"]) == det["ood"]["svhn"]["fpr95"]
    assert float(lookup[("msp", "mean", "auroc")]["value"]) in (det["near"]["auroc"],
                                                                det["far"]["auroc"])
    assert float(lookup[("", "", "classifier_accuracy")]["value"]) == \
        res["classifier_accuracy"]


class _Parser(html.parser.HTMLParser):

  def __init__(self):
    super().__init__()
    self.imgs, self.stack, self.tables, self.title = [], [], 0, ""
    self._in_title = False

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.imgs.append(dict(attrs))
      return
    if tag in ("meta", "br"):
      return
    self.stack.append(tag)
    self.tables += tag == "table"
    self._in_title = tag == "title"

  def handle_endtag(self, tag):
    assert self.stack and self.stack[-1] == tag, (self.stack, tag)
    self.stack.pop()
    self._in_title = False

  def handle_data(self, data):
    if self._in_title:
      self.title += data


def test_write_report_html_embeds_pngs(tmp_path):
  res, scores = _results()
  out = tmp_path / "rep"
  paths = R.write_report(res, out, scores=scores)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(["results.json", "results.csv", "results.md", "roc.png",
                          "hist_msp.png", "hist_grood_x.png", "hist_energy.png",
                          "auroc_bars.png", "report.html", "scores.npz"])
  assert all(os.path.isfile(p) for p in paths)
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  with open(out / "results.json") as f:
    assert json.load(f) == {"schema_version": R.SCHEMA_VERSION, **json.loads(json.dumps(res))}
  text = (out / "report.html").read_text()
  assert text.startswith("<!DOCTYPE html>")
  p = _Parser()
  p.feed(text)
  p.close()
  assert p.stack == []
  assert p.tables >= 3
  assert "cifar10" in p.title and "ckpt/a" in p.title
  assert "grood &lt;x&gt;" in text and "grood <x>" not in text  # escaped
  assert len(p.imgs) == 5
  for img in p.imgs:
    src = img["src"]
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1], validate=True)[:8] == PNG_MAGIC
  for name in ("roc.png", "auroc_bars.png", "hist_msp.png"):
    assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_plots_standalone(tmp_path):
  res, scores = _results()
  agg = S.aggregate_runs([res, _results(1, "b")[0]])
  for path in (R.plot_auroc_bars(agg, tmp_path / "bars.png"),
               R.plot_roc({"msp": scores["msp"]}, tmp_path / "roc.png"),
               R.plot_histograms({"id": np.ones(5), "x": np.ones(3)}, tmp_path / "h.png",
                                 "constant")):
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
  res, _ = _results()
  path = tmp_path / "results.json"
  R.write_json(res, path)
  before = path.read_bytes()

  def broken_dump(obj, f, **kw):
    f.write('{"partial": ')
    f.flush()
    raise RuntimeError("disk full")

  monkeypatch.setattr(R.json, "dump", broken_dump)
  with pytest.raises(RuntimeError, match="disk full"):
    R.write_json({"other": 1}, path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["results.json"]  # temp file cleaned up

  # Same through write_report: a failing plot leaves the earlier HTML in place.
  monkeypatch.undo()
  out = tmp_path / "rep"
  R.write_report(res, out)
  html_before = (out / "report.html").read_bytes()

  def broken_save(fig, p):
    return R.atomic_write(p, lambda f: (f.write(b"\x89PNG garbage"), 1 / 0))

  monkeypatch.setattr(R, "_save_png", broken_save)
  with pytest.raises(ZeroDivisionError):
    R.write_report(res, out)
  assert (out / "report.html").read_bytes() == html_before
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_write_report_bad_dir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  from grood_jax.errors import OutputError
  with pytest.raises(OutputError, match="cannot create the report beside"):
    R.write_report(_results()[0], blocker / "sub")
  assert blocker.read_text() == "x"
