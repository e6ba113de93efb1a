"""Outlier data named everywhere (issue 15): each row says whether it uses real outlier data,
the two groups are ranked apart, `--select` keeps GROOD's post-hoc selection free of the
`oodval` source and reports `grood+oe` / `grood[openood]` as their own rows.

score.main runs in-process on the tiny synthetic benchmark of test_cli_errors; the GROOD grids
are cut down (monkeypatched) so that the run takes seconds.
"""

import json

import pytest

from test_cli_errors import _save, _score

from grood_jax import report
from grood_jax.detectors import detector_class, make_detector
from grood_jax.scoring import ScoreOptions, detector_rows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("ckpt_groups"))


def test_uses_outlier_data_per_setting():
  assert not make_detector("grood").uses_outlier_data()
  assert make_detector("grood", source="noise+oodval").uses_outlier_data()
  assert make_detector("grood+oe").uses_outlier_data()
  oo = make_detector("grood[openood]")
  assert oo.uses_outlier_data() and oo.params["source"] == "oodval"
  assert (oo.params["k"], oo.params["tau"], oo.params["normalize"]) == (1, 1.0, False)
  assert not make_detector("knn").uses_outlier_data()
  # grood's own grid holds no real-outlier source; grood+oe's holds only that one
  assert all(not make_detector("grood", **p).uses_outlier_data()
             for p in make_detector("grood").grid_points())
  assert all(make_detector("grood+oe", **p).uses_outlier_data()
             for p in make_detector("grood+oe").grid_points())


def test_detector_rows_add_the_outlier_variants_only_with_select():
  o = ScoreOptions(detectors=["msp", "grood", "knn"])
  assert detector_rows(o) == ["msp", "grood", "knn"]
  o = ScoreOptions(detectors=["msp", "grood", "knn"], select=True)
  assert detector_rows(o) == ["msp", "grood", "grood+oe", "grood[openood]", "knn"]
  o = ScoreOptions(detectors=["grood", "grood+oe"], select=True)
  assert detector_rows(o) == ["grood", "grood[openood]", "grood+oe"]
  o = ScoreOptions(detectors=["grood"], select=True,
                   detector_params={"grood": {"source": "oodval"}})
  assert detector_rows(o) == ["grood"]                   # the user fixed the source


def test_groups_ranked_apart_in_every_table():
  def det(near, outliers):
    m = {"auroc": near, "fpr95": 0.5}
    return {"params": {}, "near": m, "far": m, "ood": {"a": {"group": "near", **m}},
            "outlier_data": outliers}
  res = {"benchmark": "b", "checkpoint": "c",
         "detectors": {"a": det(0.7, False), "oe": det(0.95, True), "b": det(0.8, False),
                       "oe2": det(0.6, True)}}
  assert report.sorted_detectors(res) == ["b", "a", "oe", "oe2"]
  assert report.group_ranks(res) == {"b": 1, "a": 2, "oe": 1, "oe2": 2}
  lines = report.format_table(res).splitlines()
  rows = [line.split() for line in lines if line.split()[:1] in (["a"], ["b"], ["oe"], ["oe2"])]
  assert [r[:3] for r in rows[:4]] == [["b", "no", "1"], ["a", "no", "2"], ["oe", "yes", "1"],
                                       ["oe2", "yes", "2"]]
  csv_flags = {r["detector"]: r["value"] for r in report.csv_rows(res)
               if r["metric"] == "outlier_data"}
  assert csv_flags == {"a": 0.0, "b": 0.0, "oe": 1.0, "oe2": 1.0}


def test_select_reports_outlier_rows_apart(capsys, tmp_path, ckpt, monkeypatch):
  grood = detector_class("grood")
  monkeypatch.setattr(grood, "grid", dict(source=["noise", "protomean"], tau=[1.0, 10.0]))
  monkeypatch.setattr(detector_class("grood+oe"), "grid", dict(tau=[1.0, 10.0]))
  out = tmp_path / "out"
  rc, text, err = _score(capsys, "--ckpt", ckpt, "--detectors", "grood,msp", "--select",
                         "--param", "grood.n_ood=8", "--no-plots", "--quiet", "--out", out)
  assert rc == 0, err
  res = json.load(open(out / "results.json"))
  dets = res["detectors"]
  assert set(dets) == {"grood[default]", "grood", "grood+oe", "grood[openood]", "msp"}
  flags = {n: d["outlier_data"] for n, d in dets.items()}
  assert flags == {"grood[default]": False, "grood": False, "grood+oe": True,
                   "grood[openood]": True, "msp": False}
  assert dets["grood"]["params"]["source"] in ("noise", "protomean")
  assert dets["grood+oe"]["params"]["source"] == "oodval"
  assert {g["params"]["source"] for g in res["selection"]["grood"]["grid"]} == {
      "noise", "protomean"}
  assert "grood[openood]" not in res["selection"]       # a fixed setting: nothing to select
  assert res["meta"]["training_uses_outlier_data"] is False
  # the terminal table: no-outlier rows first, each group ranked from 1
  rows = [line.split() for line in text.splitlines() if line.split()[:1] and
          line.split()[0] in dets]
  summary = rows[:len(dets)]
  groups = [r[1] for r in summary]
  assert groups == sorted(groups)                       # "no" ... then "yes"
  for g in ("no", "yes"):
    ranks = [int(r[2]) for r in summary if r[1] == g]
    assert ranks == list(range(1, len(ranks) + 1))
  near = {n: dets[n]["near"]["auroc"] for n in dets}
  yes = [r[0] for r in summary if r[1] == "yes"]
  assert yes == sorted(yes, key=lambda n: -near[n])


def _part(fps, rows, bench="b"):
  return {"benchmark": bench, "checkpoint": ["x"], "meta_per_run": [{"model_fingerprint": f}
                                                                    for f in fps],
          "detectors": {n: {"params": p, "near": {"auroc": a}, "far": {"auroc": a}, "ood": {}}
                        for n, (p, a) in rows.items()},
          "selection": {n: {"chosen": p} for n, (p, a) in rows.items()}}


def test_merge_results_same_checkpoints_later_rows_win(tmp_path):
  import importlib.util
  import os
  from grood_jax import stats
  a = _part(["f0", "f1"], {"msp": ({}, 0.6), "grood": ({"source": "oodval"}, 0.8)})
  b = _part(["f0", "f1"], {"grood": ({"source": "noise"}, 0.7),
                           "grood[openood]": ({"source": "oodval"}, 0.75)})
  m = stats.merge_results([a, b])
  assert list(m["detectors"]) == ["msp", "grood", "grood[openood]"]
  assert m["detectors"]["grood"]["near"]["auroc"] == 0.7
  assert m["selection"]["grood"]["chosen"] == {"source": "noise"}
  with pytest.raises(ValueError, match="other checkpoints"):
    stats.merge_results([a, _part(["f0", "f9"], {"knn": ({}, 0.5)})])
  with pytest.raises(ValueError, match="benchmark"):
    stats.merge_results([a, _part(["f0", "f1"], {"knn": ({}, 0.5)}, bench="c")])
  # the script fills the flags of pre-schema-2 rows from the detector settings
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("merge_results",
                                                os.path.join(root, "scripts", "merge_results.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for part in (a, b):
    mod.fill_outlier_flags(part)
  assert a["detectors"]["grood"]["outlier_data"] and not a["detectors"]["msp"]["outlier_data"]
  assert not b["detectors"]["grood"]["outlier_data"]
  assert b["detectors"]["grood[openood]"]["outlier_data"]


def test_harness_passes_the_id_val_split(capsys, tmp_path, ckpt):
  """score.py gives detectors the benchmark's labelled ID validation split as ctx.id_val:
  tempscale T=nll fits on it (a DetectorError without it) and autofold calibrates on it."""
  out = tmp_path / "out"
  rc, _, err = _score(capsys, "--ckpt", ckpt, "--detectors", "tempscale,msp", "--param",
                      "tempscale.T=nll", "--no-plots", "--quiet", "--out", out)
  assert rc == 0, err
  res = json.load(open(out / "results.json"))
  assert res["detectors"]["tempscale"]["params"]["T"] == "nll"
