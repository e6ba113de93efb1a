"""What the report holds (issue 14): AUPR-In/Out in every table, each detector's parameters,
the selection grid, provenance, ROC of every detector, readable histograms, scores.npz that
reproduces results.json, schema_version, progress bars / lines, --allow-missing.

score.main runs in-process on the tiny synthetic benchmark of test_cli_errors.
"""

import html.parser
import json
import os

import numpy as np
import pytest

from test_cli_errors import _save, _score

from grood_jax import metrics, report, stats


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("ckpt_rep"))


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory):
  """One scoring run with four detectors and --select (react's grid has 4 points)."""
  out = tmp_path_factory.mktemp("rep") / "out"
  import test_cli_errors as t
  rc = t.score.main(["--ckpt", ckpt, "--detectors", "grood,msp,energy,knn,react", "--param",
                     "knn.k=5", "--param", "grood.n_ood=8", "--out", str(out), "--quiet"])
  assert rc == 0
  rc = t.score.main(["--ckpt", ckpt, "--detectors", "react,energy", "--select",
                     "--out", str(out) + "_sel", "--quiet", "--no-plots"])
  assert rc == 0
  return out, str(out) + "_sel"


class _Doc(html.parser.HTMLParser):
  """Sections by id, tables as lists of rows of cell texts, figure captions."""

  def __init__(self):
    super().__init__()
    self.section = None
    self.tables: dict[str, list] = {}
    self.captions: list[str] = []
    self._cell = None
    self._in_caption = False
    self.grids: list[str] = []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "section":
      self.section = a.get("id")
    elif tag == "table":
      self.tables.setdefault(self.section, []).append([])
    elif tag == "tr":
      self.tables[self.section][-1].append([])
    elif tag in ("td", "th"):
      self._cell = ""
    elif tag == "figcaption":
      self._in_caption = True
      self.captions.append("")
    elif tag == "details" and "data-detector" in a:
      self.grids.append(a["data-detector"])

  def handle_endtag(self, tag):
    if tag in ("td", "th"):
      self.tables[self.section][-1][-1].append(self._cell.strip())
      self._cell = None
    elif tag == "figcaption":
      self._in_caption = False
    elif tag == "section":
      self.section = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell += data
    if self._in_caption:
      self.captions[-1] += data


def _doc(path):
  d = _Doc()
  d.feed(open(path, encoding="utf-8").read())
  d.close()
  return d


def test_scores_npz_recomputes_results_json(run):
  out, _ = run
  res = json.load(open(out / "results.json"))
  assert res["schema_version"] == report.SCHEMA_VERSION
  with np.load(out / "scores.npz", allow_pickle=False) as z:
    assert int(z["schema_version"]) == report.SCHEMA_VERSION
    assert list(z["detectors"]) == list(res["detectors"])
    assert z["sets"][0] == "id" and set(z["sets"][1:]) == set(res["meta"]["sets"])
    assert z["labels/id"].shape == (res["meta"]["num_id_test"],)
    for det, entry in res["detectors"].items():
      s_id = z[f"scores/{det}/id"]
      assert s_id.shape == (1, res["meta"]["num_id_test"]) and s_id.dtype == np.float64
      for set_name, m in entry["ood"].items():
        s = z[f"scores/{det}/{set_name}"]
        assert s.shape == (1, res["meta"]["sets"][set_name]["size"])
        np.testing.assert_array_equal(z[f"ids/{set_name}"], np.arange(s.shape[1]))
        assert str(z[f"group/{set_name}"]) == m["group"]
        got = stats.metrics_from_scores(s_id[0], s[0])
        for k in metrics.METRIC_NAMES:
          assert got[k] == m[k], (det, set_name, k)          # exactly, not approximately
      # group means too
      assert stats.group_means(entry["ood"]) == {g: entry[g] for g in ("near", "far") if g in entry}


def test_results_json_has_no_provenance_or_time(run):
  out, _ = run
  text = (out / "results.json").read_text()
  for word in ("date", "jax", "command", "_s\"", "git"):
    assert word not in text, word
  prov = json.load(open(out / "provenance.json"))
  assert {"command", "date", "versions", "device", "checkpoints"} <= set(prov)
  assert {"grood_jax", "jax", "flax"} <= set(prov["versions"])
  assert prov["checkpoints"][0]["config"]["benchmark"] == "tiny_synth_cli"
  assert "--detectors grood,msp,energy,knn,react" in prov["command"]


def test_html_sections(run):
  out, _ = run
  d = _doc(out / "report.html")
  summary = d.tables["summary"][0]
  header = summary[0]
  for col in ("Near AUROC", "Near AUPR-In", "Near AUPR-Out", "Near FPR95", "Near FPR95-OO"):
    assert col in header, header
  res = json.load(open(out / "results.json"))
  names = [r[0] for r in summary[1:]]
  assert sorted(names) == sorted(res["detectors"])
  row = summary[1]
  det = res["detectors"][row[0]]
  assert row[header.index("Near AUPR-In")] == f"{100 * det['near']['aupr_in']:.2f}"
  assert row[header.index("Near AUPR-Out")] == f"{100 * det['near']['aupr_out']:.2f}"
  per_set = d.tables["per-set"][0]
  assert {"AUPR-In", "AUPR-Out"} <= set(per_set[0])
  params = {r[0]: r[1] for r in d.tables["parameters"][0][1:]}
  assert set(params) == set(res["detectors"])
  assert "k=5" in params["knn"] and "n_ood=8" in params["grood"]
  assert "percentile=90" in params["react"]
  prov = {r[0]: r[1] for r in d.tables["provenance"][0]}
  assert "score" in prov["Command"] and "--out" in prov["Command"]
  assert prov["jax version"] and prov["flax version"] and prov["grood_jax version"]
  assert prov["Date (UTC)"].startswith("20") and "platform=" in prov["Device"]
  roc = [c for c in d.captions if c.startswith("roc.png")]
  assert len(roc) == 1 and f"all {len(res['detectors'])} detectors" in roc[0]
  hists = [c for c in d.captions if c.startswith("hist_")]
  assert len(hists) == len(res["detectors"]) and all(" x axis)" in c for c in hists)
  md = (out / "results.md").read_text()
  assert "| Near AUPR-In |" in md and "## Detector parameters" in md


def test_selection_grid_in_html_and_markdown(run):
  _, sel_out = run
  res = json.load(open(os.path.join(sel_out, "results.json")))
  d = _doc(os.path.join(sel_out, "report.html"))
  assert d.grids == list(res["selection"])
  grids = d.tables["selection"][1:]                 # [0] is the chosen-settings table
  react = grids[list(res["selection"]).index("react")]
  assert react[0] == ["percentile", "Val AUROC"]
  assert [r[1] for r in react[1:]] == [f"{100 * g['auroc']:.2f}"
                                       for g in res["selection"]["react"]["grid"]]
  assert len(react) - 1 == 4
  text = open(os.path.join(sel_out, "report.html")).read()
  assert text.count('class="chosen"') == len(res["selection"])
  params = {r[0]: r[2] for r in d.tables["parameters"][0][1:]}
  assert params["react"] == "--select"
  md = open(os.path.join(sel_out, "results.md")).read()
  assert "### react: grid (4 points, chosen in bold)" in md


def test_roc_draws_every_detector(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  curves = {f"det{i}": {"id": rng.normal(1, 1, 50), "a": rng.normal(0, 1, 40),
                        "b": rng.normal(0, 1, 30)} for i in range(12)}
  figs = []
  monkeypatch.setattr(report, "_save_png", lambda fig, path: figs.append(fig) or path)
  report.plot_roc(curves, tmp_path / "roc.png")
  axes = [ax for ax in figs[0].axes if ax.get_legend() is not None]
  assert len(axes) == 2
  for ax in axes:
    labels = [t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()]
    assert labels == list(curves)                       # all 12, not the top 3
  styles = {(str(l.get_color()), l.get_linestyle()) for l in axes[0].lines[:-1]}
  assert len(styles) == 12                              # each one distinguishable


def test_histogram_scale_shows_the_distributions(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  grood_like = {"id": -rng.chisquare(2, 500) * 1e-4, "ood": -rng.chisquare(2, 300) * 1e-2}
  assert report.histogram_scale(grood_like.values())[0] == "symlog"
  normal = {"id": rng.normal(2, 1, 500), "ood": rng.normal(0, 1, 300)}
  assert report.histogram_scale(normal.values()) == ("linear", None)
  spike = {"id": 5 + rng.normal(0, 1e-3, 500), "ood": rng.normal(0, 3, 300)}
  assert report.histogram_scale(spike.values())[0] == "rank"
  figs = []
  monkeypatch.setattr(report, "_save_png", lambda fig, path: figs.append(fig) or path)
  report.plot_histograms(grood_like, tmp_path / "h.png")
  ax = figs[0].axes[0]
  assert ax.get_xscale() == "symlog" and "symlog" in ax.get_xlabel()
  report.plot_histograms(spike, tmp_path / "h2.png")
  assert "rank" in figs[1].axes[0].get_xlabel()
  report.plot_histograms(normal, tmp_path / "h3.png")
  assert figs[2].axes[0].get_xscale() == "linear" and "linear" in figs[2].axes[0].get_xlabel()


# ----------------------------------------------------------------------------- progress


def test_progress_plain_lines_when_not_a_terminal(capsys, tmp_path, ckpt):
  rc, out, err = _score(capsys, "--ckpt", ckpt, "--detectors", "msp,knn", "--param", "knn.k=3",
                        "--no-plots", "--out", tmp_path / "out")
  assert rc == 0, err
  assert "features of train: 64 images" in err and "knn: fit" in err
  assert "\r" not in err and "it/s" not in err and "img/s" not in err      # no bar
  rc, out, err = _score(capsys, "--ckpt", ckpt, "--detectors", "msp", "--no-plots", "--quiet",
                        "--out", tmp_path / "out2")
  assert rc == 0 and err == "" and "Detector" in out, err


def test_progress_bars_on_a_terminal(capsys, tmp_path, ckpt, monkeypatch):
  import sys
  from grood_jax.cli import score as cli
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  monkeypatch.setattr(cli.Progress, "MININTERVAL", 0)      # every update drawn
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--detectors", "msp,react", "--select",
                      "--no-plots", "--out", tmp_path / "out")
  assert rc == 0, err
  assert "features train" in err and "64/64" in err                # per set, with counts
  assert "select react" in err and "4/4" in err                    # each grid point
  assert "react" in err and "3/3" in err                           # fit + id + 1 OOD set
  assert "features of train: 64 images" in err                     # log lines beside the bars


def test_progress_inside_gradients_and_knn(capsys, tmp_path, ckpt, monkeypatch):
  """GROOD's gradient batches and every kNN search (GROOD's bank, KNN's) show bars with counts."""
  import re
  import sys
  from grood_jax.cli import score as cli
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  monkeypatch.setattr(cli.Progress, "MININTERVAL", 0)
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--detectors", "grood,knn", "--param",
                      "grood.n_ood=8", "--param", "knn.k=3", "--no-plots", "--out",
                      tmp_path / "out")
  assert rc == 0, err
  bank = re.findall(r"grood gradients train \(bank\):.*?(\d+)/(\d+)", err)
  assert bank and bank[-1][0] == bank[-1][1] and 0 < int(bank[-1][1]) <= 64
  n_id = 32                                                 # the tiny benchmark's ID test set
  assert re.search(rf"grood gradients test:.*{n_id}/{n_id}", err), err
  assert re.search(rf"grood kNN test vs bank of {bank[-1][1]}:.*{n_id}/{n_id}", err), err
  assert re.search(rf"knn test vs bank of 64:.*{n_id}/{n_id}", err), err


def test_warning_lines_name_their_source(capsys):
  import warnings
  from grood_jax.cli.common import run_cli
  def work():
    warnings.warn_explicit("old API", DeprecationWarning, "/x/site-packages/pkg/mod.py", 12)
    warnings.warn_explicit("cache unreadable", UserWarning, "/y/grood_jax/scoring.py", 3)
    return 0
  assert run_cli(work) == 0
  err = capsys.readouterr().err.splitlines()
  assert err == ["warning: old API [DeprecationWarning, pkg/mod.py:12]",
                 "warning: cache unreadable"]


def test_no_progress_off_process_zero(capsys, tmp_path, ckpt, monkeypatch):
  import jax
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  rc, out, err = _score(capsys, "--ckpt", ckpt, "--detectors", "msp", "--no-plots",
                        "--out", tmp_path / "out")
  assert rc == 0 and err == "" and out == "", err


# ----------------------------------------------------------------------------- --allow-missing


def test_allow_missing_on_the_command_line(capsys, tmp_path, monkeypatch):
  from test_openood_data import CIFAR_SETS, _write_tree
  from grood_jax import checkpoint
  from grood_jax.data import openood
  from grood_jax.models import build_model
  from test_cli_errors import _config
  monkeypatch.setattr(openood, "NOISE_SIZE", 16)
  root = str(tmp_path / "openood")
  _write_tree(root, {k: v for k, v in CIFAR_SETS.items() if k not in ("test_svhn", "val_tin")})
  c = _config()
  c.benchmark = "cifar10"
  model = build_model("cnn", num_classes=10, in_channels=3, seed=0, width=4, feature_dim=8)
  work = str(tmp_path / "ck")
  checkpoint.save(work, 1, model, None, c)
  argv = ["--ckpt", work, "--data-root", root, "--detectors", "msp", "--no-plots"]
  rc, _, err = _score(capsys, *argv, "--out", tmp_path / "a")
  assert rc == 2 and "test_svhn.txt not found" in err and not (tmp_path / "a").exists()
  rc, _, err = _score(capsys, *argv, "--allow-missing", "--out", tmp_path / "b")
  assert rc == 0, err
  warns = [line for line in err.splitlines() if line.startswith("warning: ")]
  assert len(warns) == 1 and "svhn" in warns[0] and "OOD val set tin" in warns[0], err
  res = json.load(open(tmp_path / "b" / "results.json"))
  assert "svhn" not in res["meta"]["sets"] and "mnist" in res["meta"]["sets"]
