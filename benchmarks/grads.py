"""Per-sample GROOD gradients dL/dp_ood: ours vs a Python loop vs the authors' way in PyTorch.

Grid: N in {10k, 50k} samples, D in {128, 512, 2048}, C in {10, 100} classes (C + 1
prototypes). Methods, all on the same float32 data, interleaved in one process:
  ours_autodiff   `batched_grads(method="autodiff")`: jit(vmap(grad)) in fixed batches
  ours_closed     `batched_grads(method="closed_form")`
  jax_loop        a Python loop over samples of a jitted single-sample `jax.grad`
                  (timed on a subset, extrapolated per sample)
  torch_loop      the authors' procedure: per sample, a leaf p_ood with requires_grad, the NCP
                  loss, `torch.autograd.grad` (subset, extrapolated per sample)
  torch_vmap      `torch.func.vmap(torch.func.grad(loss))` in the same batches as ours
torch columns are left out when torch is not installed.

  python benchmarks/grads.py [--quick] [--out DIR] [--subset 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _util

NAME = "grads"


def make_data(n, d, c, seed=0):
  rng = np.random.default_rng(seed)
  protos = rng.standard_normal((c, d), dtype=np.float32)
  feats = protos[rng.integers(0, c, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
  ood = protos.mean(0)
  logits_targets = rng.integers(0, c, n).astype(np.int32)
  return feats, protos, ood, logits_targets


def jax_methods(feats, protos, ood, targets, subset):
  import jax
  import jax.numpy as jnp
  from grood_jax.grood import loss as L

  one = jax.jit(jax.grad(lambda p, h, t, cp: L.ncp_loss(h, jnp.concatenate([cp, p[None]]), t)))
  cp = jnp.asarray(protos)
  p = jnp.asarray(ood)

  def loop():
    return [one(p, jnp.asarray(feats[i]), int(targets[i]), cp) for i in range(subset)]

  return {
      "ours_autodiff": lambda: L.batched_grads(feats, protos, ood, targets, method="autodiff"),
      "ours_closed": lambda: L.batched_grads(feats, protos, ood, targets, method="closed_form"),
      "jax_loop": loop,
  }


def torch_methods(torch, feats, protos, ood, targets, subset, batch):
  tf = torch.from_numpy(feats)
  tp = torch.from_numpy(protos)
  to = torch.from_numpy(ood)
  tt = torch.from_numpy(targets.astype(np.int64))

  def ncp(h_D, protos_PxD, t):
    s = -torch.linalg.vector_norm(h_D[None, :] - protos_PxD, dim=1)
    return torch.logsumexp(s, 0) - torch.gather(s, 0, t.reshape(1))[0]

  def loop():                       # the authors' OpenOOD integration: one sample at a time
    out = []
    for i in range(subset):
      p = to.clone().requires_grad_(True)
      loss = ncp(tf[i], torch.cat([tp, p[None]]), tt[i])
      out.append(torch.autograd.grad(loss, p)[0])
    return out

  from torch.func import grad, vmap
  g = vmap(grad(lambda p, h, t: ncp(h, torch.cat([tp, p[None]]), t)), in_dims=(None, 0, 0))

  def vmapped():
    with torch.no_grad():
      # clone: the per-batch result is a view into a (B, C+1, D) buffer; keeping views would
      # keep every such buffer alive (0.8 MB per sample at C=100, D=2048)
      return [g(to, tf[s:s + batch], tt[s:s + batch]).clone() for s in range(0, len(tf), batch)]

  return {"torch_loop": loop, "torch_vmap": vmapped}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--subset", type=int, default=200, help="samples timed in the Python loops")
  ap.add_argument("--reps", type=int, default=1)
  ap.add_argument("--torch-threads", type=int, default=1,
                  help="torch intra-op threads (0: the core count, as JAX's CPU pool)")
  args = ap.parse_args()
  cond = _util.Conditions(torch_threads=_util.set_torch_threads(args.torch_threads))
  torch = _util.optional("torch")
  if torch is not None:
    torch.manual_seed(0)
  from grood_jax.grood.loss import default_batch_size
  grid = ([(2000, 64, 10), (1000, 64, 100)] if args.quick else
          [(n, d, c) for n in (10_000, 50_000) for d in (128, 512, 2048) for c in (10, 100)])
  subset = min(args.subset, 50) if args.quick else args.subset
  rows = []
  for n, d, c in grid:
    feats, protos, ood, targets = make_data(n, d, c)
    batch = default_batch_size(c + 1, d)
    fns = jax_methods(feats, protos, ood, targets, subset)
    if torch is not None:
      fns.update(torch_methods(torch, feats, protos, ood, targets, subset, batch))
    # one warm-up run each (JIT compiles, torch.func set-up), then interleaved timing
    t = _util.interleaved(fns, reps=args.reps, warmup=1)
    row = {"N": n, "D": d, "C": c, "batch": batch}
    for name, secs in t.items():
      per_n = n / subset if name.endswith("_loop") else 1.0
      row[f"{name}_s"] = secs * per_n                              # for all N samples
    base = row["ours_autodiff_s"]
    for name in t:
      if name != "ours_autodiff":
        row[f"{name}/ours"] = row[f"{name}_s"] / base
    rows.append(row)
    print(_util.table([row], list(row)), flush=True)
    _util.save(NAME, {"benchmark": NAME, "partial": True, "rows": rows}, args.out)
  payload = {"benchmark": NAME, "quick": args.quick, "machine": _util.machine(),
             "loops_extrapolated_from": subset,
             "timing": "median of interleaved runs in one process (JIT warm); *_loop methods "
                       "timed on the first `loops_extrapolated_from` samples and scaled to N",
             "rows": rows}
  print()
  cols = ["N", "D", "C", "ours_autodiff_s", "ours_closed_s", "jax_loop_s", "torch_loop_s",
          "torch_vmap_s", "jax_loop/ours", "torch_loop/ours", "torch_vmap/ours"]
  print(_util.table(rows, cols))
  _util.finish(payload, cond)
  path = _util.save(NAME, payload, args.out)
  plot(rows, _util.plot_path(NAME, args.out))
  print(f"wrote {path}")


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [f"N={r['N'] // 1000}k\nD={r['D']} C={r['C']}" for r in rows]
  keys = [k for k in ("ours_autodiff_s", "ours_closed_s", "jax_loop_s", "torch_loop_s",
                      "torch_vmap_s") if k in rows[0]]
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
  w = 0.8 / len(keys)
  x = np.arange(len(rows))
  for j, k in enumerate(keys):
    ax.bar(x + j * w, [r[k] for r in rows], w, label=k[:-2])
  ax.set_yscale("log"); ax.set_xticks(x + 0.4 - w / 2); ax.set_xticklabels(labels, fontsize=7)
  ax.set_ylabel("seconds for all N samples"); ax.legend(fontsize=7)
  ax.set_title("per-sample dL/dp_ood (loops extrapolated from a subset)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
