"""GROOD ablations on fashion_mnist_6v4 (issue 15): one factor at a time from the authors'
setting, 3 seeds; the best GROOD without outlier data chosen on validation data only; pi_ood.

  nice python scripts/grood_ablations.py --ckpt /work/runs/6v4_s0 /work/runs/6v4_s1 \
      /work/runs/6v4_s2 --out results/grood_ablation

Each checkpoint and the benchmark are loaded once, features extracted once (FeatureCache,
on disk under --cache), then every GROOD setting is fitted on the ID train split and scored on
the ID test split and every test OOD set (near: fmnist_6to9; far: letters, mnist, textures).

  ablation  base = source mixup, lam 0.5, tau 1, k 1, no normalisation, layer early (block1);
            one factor changed at a time: lam {0.2, 0.5, 0.8}, layer (each split point),
            tau {1, 10, 100}, normalize {off, on}, k {1, 5, 10},
            source {mixup, noise, noise_ref, protomean, oodval}
  select    the no-outlier grid (sources mixup, noise, noise_ref, protomean x tau {1, 10, 100}
            x normalize x k {1, 5}), every point refitted and scored on the ID validation split
            against the selection half of letters_val (as scoring.select_params does; test OOD
            sets never seen); the best point is then scored on the test sets. The same for
            the outlier-using group (source oodval x tau x normalize x k): `grood+oe`.
  pi_ood    pi_ood = ||dL/dp_ood|| * tau on ID test and every OOD set, seed 0, the default
            setting at tau = 1 and at the selected tau, and the selected setting.

Writes (under --out): ablation.json (every run, per seed and mean +- std), ablation.md,
ablation.png, pi_ood.png, ablation.log (progress). Partial results are saved after each seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

from grood_jax import metrics
from grood_jax.detectors import Context, make_detector
from grood_jax.modelfns import ModelFns
from grood_jax.scoring import (FeatureCache, ScoreOptions, _check_scores, fit_and_score,
                               prepare_checkpoint, split_ood_val)
from grood_jax.stats import group_means

BASE = dict(source="mixup", lam=0.5, tau=1.0, k=1, normalize=False, layer="early")
FACTORS = [("lam", [0.2, 0.5, 0.8]), ("layer", None), ("tau", [1.0, 10.0, 100.0]),
           ("normalize", [False, True]), ("k", [1, 5, 10]),
           ("source", ["mixup", "noise", "noise_ref", "protomean", "oodval"])]
SELECT_GRID = dict(source=["mixup", "noise", "noise_ref", "protomean"], tau=[1.0, 10.0, 100.0],
                   normalize=[False, True], k=[1, 5])
SELECT_GRID_OE = dict(source=["oodval"], tau=[1.0, 10.0, 100.0], normalize=[False, True],
                      k=[1, 5])
METRIC_KEYS = ("auroc", "fpr95", "fpr95_openood")


def log(msg: str, fh=None):
  line = f"[{time.strftime('%H:%M:%S')}] {msg}"
  print(line, flush=True)
  if fh is not None:
    fh.write(line + "\n")
    fh.flush()


def key_of(params: dict) -> str:
  return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)


class Seed:
  """One checkpoint: the Context and splits built once, every GROOD setting scored on them."""

  def __init__(self, ckpt: str, benchmarks: dict, cache_dir: str | None, seed: int = 0):
    opts = ScoreOptions(detectors=[], select=True, seed=seed, batch_size=512,
                        cache_dir=cache_dir)
    prep = prepare_checkpoint(ckpt, opts, benchmarks=benchmarks)
    bench = prep.bench
    fns = ModelFns(prep.model)
    cache = FeatureCache(fns, fns.params, mean=bench.mean, std=bench.std, batch_size=512,
                         cache_dir=cache_dir)
    self.train = cache.split(bench.id_train)
    self.id_test = cache.split(bench.id_test)
    self.ood = [(s.group, s.name, cache.split(s.data)) for s in prep.ood_sets]
    aux, sel = split_ood_val(bench.ood_val, seed)
    self.aux_val, self.sel_val = cache.split(aux), cache.split(sel)
    self.id_val = cache.split(bench.id_val)
    noise = cache.split(bench.noise) if bench.noise is not None else None
    self.ctx = Context(fns=fns, params=fns.params, mean=bench.mean, std=bench.std,
                       train=self.train, ood_val=self.aux_val, noise=noise, seed=seed,
                       batch_size=256)
    self.fns = fns
    self.acc = float(metrics.accuracy(self.id_test.logits.argmax(-1), self.id_test.labels))
    self.runs: dict[str, dict] = {}

  def test(self, params: dict) -> dict:
    """Fit and score on the test sets (memoised by the parameters)."""
    k = key_of(params)
    if k not in self.runs:
      det = make_detector("grood", **params)
      per_set, _, acc, t = fit_and_score(det, self.ctx, self.id_test, self.ood)
      self.runs[k] = dict(params=params, per_set=per_set, accuracy=acc, seconds=sum(t.values()),
                          uses_outlier_data=det.uses_outlier_data(), **group_means(per_set))
    return self.runs[k]

  def val_auroc(self, params: dict) -> float:
    det = make_detector("grood", **params)
    state = det.fit(self.ctx)
    s_id = _check_scores("grood", "id_val", det.score(self.ctx, state, self.id_val))
    s_ood = _check_scores("grood", "sel", det.score(self.ctx, state, self.sel_val))
    return float(metrics.auroc(s_id, s_ood))


def grid_points(grid: dict) -> list[dict]:
  keys = list(grid)
  return [{**BASE, **dict(zip(keys, v))} for v in itertools.product(*(grid[k] for k in keys))]


def summarise(values: list[float]) -> dict:
  a = np.asarray(values, np.float64) * 100
  return dict(mean=float(a.mean()), std=float(a.std(ddof=1)) if len(a) > 1 else 0.0,
              values=[float(x) for x in a])


def group_summary(runs: list[dict]) -> dict:
  out = {}
  for g in ("near", "far"):
    for m in METRIC_KEYS:
      out[f"{g}_{m}"] = summarise([r[g][m] for r in runs])
  out["accuracy"] = summarise([r["accuracy"] for r in runs])
  return out


def pm(s: dict) -> str:
  return f"{s['mean']:.2f} ± {s['std']:.2f}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--ckpt", nargs="+", required=True)
  ap.add_argument("--out", default="results/grood_ablation")
  ap.add_argument("--cache", default="/tmp/grood_ablation_cache")
  ap.add_argument("--baselines", default="results/fashion_mnist_6v4/results.json")
  ap.add_argument("--no-oe", action="store_true", help="skip the grood+oe selection")
  ap.add_argument("--select-k", type=float, nargs="+", default=None,
                  help="override the k values of the selection grids")
  ap.add_argument("--pi-only", action="store_true",
                  help="only redraw pi_ood.png / pi_ood.json for the first checkpoint, with the "
                       "setting selected for it in an existing ablation.json")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.pi_only:
    with open(os.path.join(args.out, "ablation.json")) as f:
      chosen = json.load(f)["per_seed"][0]["selection"]["grood"]["chosen"]
    plot_pi(args, pi_ood_data(Seed(args.ckpt[0], {}, args.cache), chosen))
    return 0
  fh = open(os.path.join(args.out, "ablation.log"), "w")
  grid, grid_oe = dict(SELECT_GRID), dict(SELECT_GRID_OE)
  if args.select_k:
    grid["k"] = grid_oe["k"] = [int(k) for k in args.select_k]
  t_start = time.time()
  benchmarks: dict = {}
  per_seed = []
  pi_data = None
  for si, ckpt in enumerate(args.ckpt):
    t0 = time.time()
    sd = Seed(ckpt, benchmarks, args.cache)
    log(f"{ckpt}: features ready in {time.time() - t0:.0f}s (classifier acc {sd.acc:.4f}); "
        f"split points {sd.fns.split_points}", fh)
    abl = {}
    for factor, values in FACTORS:
      if values is None:
        values = list(sd.fns.split_points)
      abl[factor] = []
      for v in values:
        t1 = time.time()
        r = sd.test({**BASE, factor: v})
        abl[factor].append(dict(value=v, key=key_of(r["params"])))
        log(f"  {factor}={v}: near {100 * r['near']['auroc']:.2f} far {100 * r['far']['auroc']:.2f}"
            f" ({time.time() - t1:.0f}s)", fh)
    sel = {}
    for label, g in (("grood", grid), ("grood+oe", None if args.no_oe else grid_oe)):
      if g is None:
        continue
      t1 = time.time()
      pts = grid_points(g)
      vals = [sd.val_auroc(p) for p in pts]
      best = pts[int(np.argmax(vals))]
      r = sd.test(best)
      sel[label] = dict(chosen=best, key=key_of(best), val_auroc=max(vals),
                        grid=[dict(params={k: p[k] for k in g}, auroc=a)
                              for p, a in zip(pts, vals)])
      log(f"  select {label}: {len(pts)} points in {time.time() - t1:.0f}s, best val "
          f"{100 * max(vals):.2f} with { {k: best[k] for k in g} }; test near "
          f"{100 * r['near']['auroc']:.2f} far {100 * r['far']['auroc']:.2f}", fh)
    if si == 0:
      pi_data = pi_ood_data(sd, sel["grood"]["chosen"])
    per_seed.append(dict(ckpt=os.path.abspath(ckpt), classifier_accuracy=sd.acc, ablation=abl,
                         selection=sel, runs=sd.runs))
    write_json(args, per_seed, grid, grid_oe)
    log(f"{ckpt}: done in {time.time() - t0:.0f}s (total {time.time() - t_start:.0f}s)", fh)
  out = write_json(args, per_seed, grid, grid_oe)
  write_md(args, out)
  plot_ablation(args, out)
  plot_pi(args, pi_data)
  log(f"all done in {time.time() - t_start:.0f}s", fh)


def pi_ood_data(sd: Seed, chosen: dict) -> dict:
  """pi_ood = ||dL/dp_ood|| * tau for ID test and every OOD set under three settings."""
  settings = [("default, τ = 1", dict(BASE)),
              (f"default, τ = {chosen['tau']:g} (selected τ)", {**BASE, "tau": chosen["tau"]}),
              (f"selected ({chosen['source']}, τ = {chosen['tau']:g}, "
               f"{'L2-norm' if chosen['normalize'] else 'raw'}, k = {chosen['k']})", dict(chosen))]
  out = []
  sets = [("ID test", sd.id_test)] + [(f"{n} ({g})", s) for g, n, s in sd.ood]
  for label, p in settings:
    det = make_detector("grood", **p)
    state = det.fit(sd.ctx)
    per = {}
    for name, split in sets:
      g = det._grads(sd.ctx, state, det._feats(split), split.logits.argmax(-1), name)
      per[name] = (np.linalg.norm(g, axis=1) * float(p["tau"])).astype(np.float64)
    bank_pi = np.linalg.norm(state["bank"], axis=1) * float(p["tau"])
    out.append(dict(label=label, params=p, pi=per, bank=bank_pi))
  return dict(settings=out)


def write_json(args, per_seed, grid, grid_oe) -> dict:
  seeds = len(per_seed)
  ablation = {}
  first = per_seed[0]
  for factor, entries in first["ablation"].items():
    rows = []
    for j, e in enumerate(entries):
      runs = [ps["runs"][ps["ablation"][factor][j]["key"]] for ps in per_seed]
      rows.append(dict(value=e["value"], uses_outlier_data=runs[0]["uses_outlier_data"],
                       **group_summary(runs)))
    ablation[factor] = rows
  selection = {}
  for label in first["selection"]:
    runs = [ps["runs"][ps["selection"][label]["key"]] for ps in per_seed]
    selection[label] = dict(chosen_per_seed=[ps["selection"][label]["chosen"] for ps in per_seed],
                            val_auroc_per_seed=[ps["selection"][label]["val_auroc"]
                                                for ps in per_seed],
                            per_set={n: summarise([r["per_set"][n]["auroc"] for r in runs])
                                     for n in runs[0]["per_set"]},
                            **group_summary(runs))
  baselines = {}
  if os.path.exists(args.baselines):
    with open(args.baselines) as f:
      res = json.load(f)
    for name, d in res["detectors"].items():
      row = {}
      for g in ("near", "far"):
        for m in METRIC_KEYS:
          row[f"{g}_{m}"] = dict(mean=100 * d[g][m], std=100 * d[g]["std"][m])
      baselines[name] = row
  out = dict(benchmark="fashion_mnist_6v4", n_seeds=seeds, base=BASE,
             factors=[f for f, _ in FACTORS], select_grid=grid, select_grid_oe=grid_oe,
             ablation=ablation, selection=selection, baselines=baselines,
             baselines_from=args.baselines,
             per_seed=[dict(ckpt=ps["ckpt"], classifier_accuracy=ps["classifier_accuracy"],
                            selection=ps["selection"],
                            runs=[{k: v for k, v in r.items()} for r in ps["runs"].values()])
                       for ps in per_seed])
  with open(os.path.join(args.out, "ablation.json"), "w") as f:
    json.dump(out, f, indent=1, default=float)
  return out


def write_md(args, out):
  n = out["n_seeds"]
  lines = [f"# GROOD ablations on fashion_mnist_6v4 ({n} seeds, mean ± std, %)", "",
           "One factor at a time from the authors' setting (mix-up at the early layer, λ = 0.5, "
           "τ = 1, k = 1, raw features); **bold** = that setting. FPR95: classic convention. "
           "oodval uses real outliers (half of letters_val).", "",
           "| factor | value | near AUROC | far AUROC | near FPR95 | far FPR95 | outliers |",
           "| :--- | :--- | ---: | ---: | ---: | ---: | :---: |"]
  for factor, rows in out["ablation"].items():
    for r in rows:
      v = r["value"]
      is_base = (v == BASE.get(factor)) or (factor == "layer" and r is rows[0])
      vs = f"**{v}**" if is_base else f"{v}"
      lines.append(f"| {factor} | {vs} | {pm(r['near_auroc'])} | {pm(r['far_auroc'])} | "
                   f"{pm(r['near_fpr95'])} | {pm(r['far_fpr95'])} | "
                   f"{'yes' if r['uses_outlier_data'] else 'no'} |")
  lines += ["", "## Selected on validation data only, against the post-hoc baselines", "",
            "Selection: ID validation split vs the selection half of letters_val (test OOD sets "
            "never seen). `grood` searches only sources without real outliers; `grood+oe` only "
            "the oodval source.", "",
            "| detector | outliers | near AUROC | far AUROC | near FPR95 | far FPR95 |",
            "| :--- | :---: | ---: | ---: | ---: | ---: |"]
  rows = []
  for label, s in out["selection"].items():
    rows.append((label + " (selected here)", label == "grood+oe", s))
  for name, b in out["baselines"].items():
    if name.startswith("grood"):
      continue
    rows.append((name, False, b))
  for label, oe, s in sorted(rows, key=lambda r: (r[1], -r[2]["near_auroc"]["mean"])):
    lines.append(f"| {label} | {'yes' if oe else 'no'} | {pm(s['near_auroc'])} | "
                 f"{pm(s['far_auroc'])} | {pm(s['near_fpr95'])} | {pm(s['far_fpr95'])} |")
  lines += ["", "Chosen per seed:"]
  for label, s in out["selection"].items():
    for i, c in enumerate(s["chosen_per_seed"]):
      lines.append(f"- {label} seed {i}: source {c['source']}, τ {c['tau']:g}, normalize "
                   f"{c['normalize']}, k {c['k']} (val AUROC {100 * s['val_auroc_per_seed'][i]:.2f})")
  lines.append(f"\nBaselines from `{out['baselines_from']}` (their own `--select`).")
  with open(os.path.join(args.out, "ablation.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def plot_ablation(args, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  factors = list(out["ablation"])
  fig, axes = plt.subplots(2, 3, figsize=(14, 8.5))
  for ax, factor in zip(axes.ravel(), factors):
    rows = out["ablation"][factor]
    x = np.arange(len(rows))
    for off, g, color in ((-0.15, "near", "tab:blue"), (0.15, "far", "tab:orange")):
      m = [r[f"{g}_auroc"]["mean"] for r in rows]
      s = [r[f"{g}_auroc"]["std"] for r in rows]
      ax.bar(x + off, m, 0.3, yerr=s, capsize=3, color=color, label=f"{g}-OOD AUROC")
    ax.set_xticks(x)
    ax.set_xticklabels([str(r["value"]) + (" *" if r["uses_outlier_data"] else "")
                        for r in rows], fontsize=11)
    ax.set_title(factor, fontsize=13)
    ax.set_ylim(40, 100)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.grid(axis="y", alpha=0.3)
  axes[0, 0].legend(loc="upper left", fontsize=10)
  fig.suptitle(f"GROOD on fashion_mnist_6v4: one factor at a time from mix-up, λ 0.5, τ 1, k 1, "
               f"raw features ({out['n_seeds']} seeds, mean ± std; * = uses real outliers)",
               fontsize=12)
  fig.tight_layout(rect=(0, 0, 1, 0.96))
  fig.savefig(os.path.join(args.out, "ablation.png"), dpi=110)
  plt.close(fig)


def plot_pi(args, data):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  settings = data["settings"]
  fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.8), sharey=False)
  for ax, st in zip(np.atleast_1d(axes), settings):
    allv = np.log10(np.maximum(np.concatenate([v for v in st["pi"].values()]), 1e-30))
    lo, hi = np.quantile(allv, 0.002), np.quantile(allv, 0.998)
    pad = max(0.02 * (hi - lo), 1e-3)
    bins = np.linspace(lo - pad, hi + pad, 70)
    for name, v in st["pi"].items():
      lv = np.log10(np.maximum(v, 1e-30))
      ax.hist(np.clip(lv, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.6,
              density=True, label=f"{name}: median {np.median(v):.1e}")
    ax.set_xlabel("log10 π_ood  (= log10(‖∂L/∂p_ood‖ · τ))", fontsize=11)
    ax.set_ylabel("density", fontsize=11)
    ax.set_title(st["label"], fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
  fig.suptitle("π_ood, the softmax mass on the OOD prototype = the gradient's norm × τ "
               "(seed 0; 1/(C+1) = 0.143 is the uniform softmax; tails beyond the 0.2 / 99.8 % "
               "quantiles drawn at the edges)", fontsize=11)
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  fig.savefig(os.path.join(args.out, "pi_ood.png"), dpi=110)
  plt.close(fig)
  summary = {st["label"]: {n: dict(median=float(np.median(v)), q10=float(np.quantile(v, 0.1)),
                                   q90=float(np.quantile(v, 0.9)),
                                   frac_below_1e3=float((v < 1e-3).mean()))
                           for n, v in {**st["pi"], "bank (ID train, correct)": st["bank"]}.items()}
             for st in settings}
  with open(os.path.join(args.out, "pi_ood.json"), "w") as f:
    json.dump(summary, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
