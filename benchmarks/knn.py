"""Exact nearest-neighbour search: ours (`knn_search`) vs faiss IndexFlatL2 vs faiss IVF.

Queries Q = 10k, D = 512, bank N in {10k, 100k, 1M}; k = 1. Data: a seeded Gaussian mixture
(100 clusters; real gradient banks are clustered, and uniform Gaussians make IVF look worse
than it is). Timings: the three methods interleaved in one process (ratios are the figures
to trust on a shared machine). Peak memory: one fresh subprocess per (N, method), peak RSS
(VmHWM) after making the data and after the search. IVF: nlist = 4 sqrt(N / 128)
(N / 128 = the number of training batches of 128), nprobe = 4; recall@1 against the exact
result. At N = 1M the exact methods are timed on a subset of the queries (--big-queries,
default 1000) and extrapolated per query; said so in the JSON.

Dimension sweep (issue 17 item 3, `--dims`, default 64,128,256,512; `--ks`, default 1,50):
Q = 10k queries x N = 100k bank (`--sweep-queries`, `--sweep-bank`), ours (`knn_search`, exact,
default block choice) and faiss IndexFlatL2 (index build + search, all cores) side by side in
one process, the two interleaved round by round after a warm-up run each; the ratio is the ratio
of the medians. Recorded as payload["dim_rows"]; the run conditions (CPU as reported, 1-minute
load at start and end, flagged above 2 per core) in payload["conditions"].

  python benchmarks/knn.py [--quick] [--out DIR] [--part dims|banks|both] [--dims 64,128]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _util

NAME = "knn"


def make_data(n_bank: int, n_query: int, dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((100, dim), dtype=np.float32) * 2.0
  bank = rng.standard_normal((n_bank, dim), dtype=np.float32)
  labels = rng.integers(0, 100, n_bank)
  for s in range(0, n_bank, 65536):                # in chunks: no second bank-sized array
    bank[s:s + 65536] += centers[labels[s:s + 65536]]
  queries = rng.standard_normal((n_query, dim), dtype=np.float32)
  queries += centers[rng.integers(0, 100, n_query)]
  return queries, bank


def ivf_nlist(n_bank: int) -> int:
  return max(1, int(round(4 * math.sqrt(n_bank / 128))))


def build_ivf(faiss, bank, nprobe=4, seed=0):
  d = bank.shape[1]
  quant = faiss.IndexFlatL2(d)
  index = faiss.IndexIVFFlat(quant, d, ivf_nlist(len(bank)))
  index.cp.seed = seed
  index.train(bank)
  index.add(bank)
  index.nprobe = nprobe
  return index


def methods(queries, bank, k=1):
  """name -> zero-argument callable returning (dists, idx)."""
  from grood_jax.ops import knn_search
  faiss = _util.optional("faiss")
  out = {"ours": lambda: knn_search(queries, bank, k)}
  if faiss is not None:
    def flat():
      index = faiss.IndexFlatL2(bank.shape[1])
      index.add(bank)
      return index.search(queries, k)
    out["faiss_flat"] = flat
    out["faiss_ivf"] = lambda: build_ivf(faiss, bank).search(queries, k)
  return out


def worker(args: dict) -> dict:
  queries, bank = make_data(args["n"], args["q"], args["d"])
  rss_data = _util.peak_rss_bytes()
  fn = methods(queries, bank)[args["method"]]
  t = time.perf_counter()
  _, idx = fn()
  secs = time.perf_counter() - t
  rss_peak = _util.peak_rss_bytes()
  return {"seconds_incl_compile": secs, "peak_rss_bytes": rss_peak,
          "rss_after_data_bytes": rss_data, "bank_bytes": bank.nbytes}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke run)")
  ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--big-queries", type=int, default=1000,
                  help="queries timed for the exact methods at N = 1M")
  ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
  ap.add_argument("--part", choices=["dims", "banks", "both"], default="both",
                  help="the dimension sweep, the bank-size sweep (D = 512), or both")
  ap.add_argument("--dims", default=None, help="dimension sweep: D values (default 64,128,256,512)")
  ap.add_argument("--ks", default=None, help="dimension sweep: k values (default 1,50)")
  ap.add_argument("--sweep-queries", type=int, default=None, help="dimension sweep: Q (10000)")
  ap.add_argument("--sweep-bank", type=int, default=None, help="dimension sweep: N (100000)")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  faiss = _util.optional("faiss")
  cond = _util.Conditions(torch_threads=None, note=None if faiss is None else
                          f"faiss OpenMP threads {os.cpu_count() or 1}")
  if args.quick:
    n_query, dim, banks, reps = 200, 64, [2_000, 10_000], args.reps or 1
  else:
    n_query, dim, banks, reps = 10_000, 512, [10_000, 100_000, 1_000_000], args.reps or 2
  if faiss is not None:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
  from grood_jax.ops import knn_search
  dim_rows = []
  if args.part in ("dims", "both"):
    dims = [int(x) for x in (args.dims or ("16,64" if args.quick else "64,128,256,512")).split(",")]
    ks = [int(x) for x in (args.ks or ("1,5" if args.quick else "1,50")).split(",")]
    sq = args.sweep_queries or (200 if args.quick else 10_000)
    sn = args.sweep_bank or (2_000 if args.quick else 100_000)
    dim_rows = dim_sweep(dims, ks, sq, sn, reps)
  if args.part == "dims":
    banks = []
  rows = []
  for n in banks:
    q_all, bank = make_data(n, n_query, dim)
    big = n >= 1_000_000
    q_exact = q_all[:args.big_queries] if big else q_all
    fns = methods(q_exact, bank)
    ivf = fns.pop("faiss_ivf", None)
    exact_fns = dict(fns)
    t = _util.interleaved(exact_fns, reps=1 if big else reps, warmup=0 if big else 1)
    row = {"N": n, "Q": n_query, "D": dim, "Q_timed_exact": len(q_exact)}
    for name, secs in t.items():
      row[f"{name}_s"] = secs * n_query / len(q_exact)         # per full query set
    if ivf is not None:
      t0 = time.perf_counter()
      index = build_ivf(faiss, bank)
      row["faiss_ivf_train_add_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      _, ivf_idx = index.search(q_all, 1)
      row["faiss_ivf_search_s"] = time.perf_counter() - t0
      row["faiss_ivf_s"] = row["faiss_ivf_train_add_s"] + row["faiss_ivf_search_s"]
      n_recall = min(len(q_all), 1000)
      _, exact_idx = knn_search(q_all[:n_recall], bank, 1)
      row["faiss_ivf_recall@1"] = float((ivf_idx[:n_recall, 0] == exact_idx[:, 0]).mean())
      row["ivf_nlist"] = ivf_nlist(n)
      del index
    if "faiss_flat_s" in row:
      row["ours/faiss_flat"] = row["ours_s"] / row["faiss_flat_s"]
    if not args.no_memory:
      for name in ["ours"] + (["faiss_flat", "faiss_ivf"] if faiss is not None else []):
        qn = args.big_queries if (big and name != "faiss_ivf") else n_query
        r = _util.run_worker(os.path.abspath(__file__),
                             {"n": n, "q": qn, "d": dim, "method": name}, timeout=1800)
        row[f"{name}_peak_rss_gib"] = r["peak_rss_bytes"] / 2**30
        row[f"{name}_rss_over_data_gib"] = (r["peak_rss_bytes"] - r["rss_after_data_bytes"]) / 2**30
      row["bank_gib"] = bank.nbytes / 2**30
    rows.append(row)
    print(_util.table([row], [c for c in row]), flush=True)
    del bank, q_all, fns, exact_fns

  payload = {"benchmark": NAME, "quick": args.quick, "machine": _util.machine(), "k": 1,
             "dim_rows": dim_rows, "dim_sweep": (
                 "ours (knn_search, exact, default blocks) and faiss IndexFlatL2 (build + "
                 "search) interleaved round by round after one warm-up run each; medians; "
                 "ours/faiss_flat = ratio of the medians"),
             "data": "seeded Gaussian mixture, 100 clusters", "timing": (
                 "median of interleaved runs in one process after a warm-up run (JIT compile "
                 "excluded); at N=1M one run of the exact methods on Q_timed_exact queries, "
                 "scaled to Q (work is linear in Q); faiss_ivf_s = train + add + search"),
             "memory": "peak RSS (VmHWM) of a fresh subprocess per (N, method); "
                       "rss_over_data = peak minus the RSS after making queries and bank",
             "rows": rows}
  if dim_rows:
    print()
    print(_util.table(dim_rows, ["N", "Q", "D", "k", "ours_s", "faiss_flat_s", "ours/faiss_flat",
                                 "faiss_flat/ours", "query_block", "bank_block", "idx_agree"]))
  print()
  if rows:
    print(_util.table(rows, ["N", "ours_s", "faiss_flat_s", "ours/faiss_flat", "faiss_ivf_s",
                           "faiss_ivf_recall@1", "ours_peak_rss_gib", "faiss_flat_peak_rss_gib",
                           "faiss_ivf_peak_rss_gib", "bank_gib"]))
  for r in dim_rows:
    if "ours/faiss_flat" in r:
      print(f"D={r['D']} k={r['k']}: ours / faiss IndexFlatL2 = {r['ours/faiss_flat']:.2f}")
  for r in rows:
    if "ours/faiss_flat" in r:
      print(f"N={r['N']}: ours / faiss IndexFlatL2 = {r['ours/faiss_flat']:.2f}")
  _util.finish(payload, cond)
  path = _util.save(NAME, payload, args.out)
  plot(rows, _util.plot_path(NAME, args.out), dim_rows)
  print(f"wrote {path}")


def dim_sweep(dims, ks, n_query, n_bank, reps):
  """Ours vs faiss IndexFlatL2 at each (D, k): interleaved rounds, medians, their ratio."""
  from grood_jax.ops import knn as knn_ops
  out = []
  for dim in dims:
    queries, bank = make_data(n_bank, n_query, dim)
    for k in ks:
      fns = methods(queries, bank, k)
      fns.pop("faiss_ivf", None)
      kc = k + knn_ops.rerank_margin(k, n_bank)
      qb, bb = knn_ops.block_sizes_for_budget(
          knn_ops.padded_query_block(knn_ops._MAX_QUERY_BLOCK, n_query), n_bank, dim, kc)
      row = {"N": n_bank, "Q": n_query, "D": dim, "k": k, "query_block": qb, "bank_block": bb}
      if "faiss_flat" in fns:         # the same neighbours (float ties aside)
        row["idx_agree"] = float(np.mean(fns["ours"]()[1] == fns["faiss_flat"]()[1]))
      t = _util.interleaved(fns, reps=reps, warmup=1)
      for name, secs in t.items():
        row[f"{name}_s"] = secs
      if "faiss_flat_s" in row:
        row["ours/faiss_flat"] = row["ours_s"] / row["faiss_flat_s"]
        row["faiss_flat/ours"] = row["faiss_flat_s"] / row["ours_s"]
      row["load_1min"] = os.getloadavg()[0]
      out.append(row)
      print(_util.table([row], list(row)), flush=True)
    del queries, bank
  return out


def plot(rows, path, dim_rows=()):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = (2 if rows else 0) + (1 if dim_rows else 0)
  fig, axes = plt.subplots(1, max(1, panels), figsize=(5 * max(1, panels), 4), squeeze=False)
  axes = list(axes[0])
  if dim_rows:
    ax = axes.pop()
    for k in sorted({r["k"] for r in dim_rows}):
      sel = [r for r in dim_rows if r["k"] == k and "ours/faiss_flat" in r]
      if sel:
        ax.plot([r["D"] for r in sel], [r["ours/faiss_flat"] for r in sel], "o-", label=f"k={k}")
    ax.axhline(1.2, color="grey", ls="--", lw=1, label="1.2x target")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xscale("log", base=2); ax.set_xlabel("dimension D")
    ax.set_ylabel("ours / faiss IndexFlatL2 (time)"); ax.legend()
    ax.set_title(f"exact kNN, Q={dim_rows[0]['Q']}, N={dim_rows[0]['N']}")
  if not rows:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return
  ax1, ax2 = axes
  ns = [r["N"] for r in rows]
  for key, label in [("ours_s", "ours (exact, jnp)"), ("faiss_flat_s", "faiss IndexFlatL2"),
                     ("faiss_ivf_s", "faiss IVF (train+search)")]:
    if all(key in r for r in rows):
      ax1.loglog(ns, [r[key] for r in rows], "o-", label=label)
  ax1.set_xlabel("bank size N"); ax1.set_ylabel("seconds for all queries"); ax1.legend()
  ax1.set_title(f"k=1 search, Q={rows[0]['Q']}, D={rows[0]['D']}")
  for key, label in [("ours_peak_rss_gib", "ours"), ("faiss_flat_peak_rss_gib", "faiss flat"),
                     ("faiss_ivf_peak_rss_gib", "faiss IVF"), ("bank_gib", "bank itself")]:
    if all(key in r for r in rows):
      ax2.loglog(ns, [r[key] for r in rows], "o-", label=label)
  ax2.set_xlabel("bank size N"); ax2.set_ylabel("peak RSS (GiB)"); ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
