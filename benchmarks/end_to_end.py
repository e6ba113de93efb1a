"""GROOD fit + score on `fashion_mnist_6v4`: ours vs the authors' procedure in PyTorch.

Stages, timed separately (both pipelines share the features; the authors' integration also
extracts features once, so that stage is counted once, for both):
  features    `features.extract` of ID train, ID test and every OOD test set
  prototypes  class means of the train features (+ p_ood = mean of the class prototypes: the
              'protomean' source, the same for both pipelines, so the comparison is fair)
  gradients   per-sample dL/dp_ood of the correctly classified train samples (the bank) and
              of every scored sample; ours: jit(vmap(grad)); theirs: a Python loop of
              `torch.autograd.grad`, one sample at a time (timed on a subset, extrapolated)
  search      ours: exact `knn_search` (k = 1); theirs: faiss IndexIVFFlat, nlist =
              4 sqrt(N / 128), nprobe = 4 (train + add + search)
Model: `--ckpt DIR` (a training work directory), else a randomly initialised SmallCNN (said
so in the JSON: the timings do not depend on the weights, the OOD quality does).

  python benchmarks/end_to_end.py [--ckpt runs/fmnist6v4_cnn] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _util

NAME = "end_to_end"


def load(args):
  from flax import nnx
  from grood_jax import data as data_lib
  from grood_jax.models.cnn import SmallCNN
  bench = data_lib.load_benchmark("fashion_mnist_6v4", seed=0)
  if args.ckpt:
    from grood_jax import checkpoint
    model, _, step = checkpoint.load_model(args.ckpt)
    model_desc = f"checkpoint {args.ckpt} (step {step})"
  else:
    model = SmallCNN(num_classes=bench.num_classes, in_channels=bench.image_shape[-1],
                     rngs=nnx.Rngs(0))
    model_desc = "randomly initialised SmallCNN (seed 0): no --ckpt given"
  return bench, model, model_desc


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--ckpt", default=None)
  ap.add_argument("--quick", action="store_true", help="first 512 images of every split")
  ap.add_argument("--out", default=None)
  ap.add_argument("--subset", type=int, default=500, help="samples timed in the torch loop")
  args = ap.parse_args()
  from grood_jax import features
  from grood_jax.ops import knn_search
  from grood_jax.grood import loss as L
  from grood_jax.grood import prototypes as P
  from grood_jax.modelfns import ModelFns

  bench, model, model_desc = load(args)
  fns = ModelFns(model)
  limit = 512 if args.quick else None
  sets = {"id_train": bench.id_train, "id_test": bench.id_test}
  sets.update({o.name: o.data if hasattr(o, "data") else o.images for o in bench.ood})
  imgs = {}
  for name, s in sets.items():
    x = s.images if hasattr(s, "images") else s
    imgs[name] = x[:limit] if limit else x
  labels = np.asarray(bench.id_train.labels)[:len(imgs["id_train"])]
  kw = dict(mean=bench.mean, std=bench.std, batch_size=512)
  features.extract(fns, fns.params, imgs["id_train"][:512], **kw)      # compile
  t = time.perf_counter()
  feats = {k: features.extract(fns, fns.params, v, **kw) for k, v in imgs.items()}
  t_feat = time.perf_counter() - t
  tr = feats["id_train"]
  c = bench.num_classes
  preds = tr.logits.argmax(1)
  keep = preds == labels
  scored = {k: v for k, v in feats.items() if k != "id_train"}
  n_bank = int(keep.sum())
  n_scored = sum(len(v.feats) for v in scored.values())

  # ---- ours
  def ours():
    out = {}
    t0 = time.perf_counter()
    protos = np.asarray(P.class_means(tr.feats, labels, c))
    ood = protos.mean(0)
    out["prototypes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank = L.batched_grads(tr.feats[keep], protos, ood, preds[keep])
    q = {k: L.batched_grads(v.feats, protos, ood, v.logits.argmax(1)) for k, v in scored.items()}
    out["gradients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc = {k: -knn_search(g, bank, 1)[0][:, 0] for k, g in q.items()}
    out["search"] = time.perf_counter() - t0
    return out, sc

  ours()                                                   # warm-up: compiles
  t_ours, _ = ours()

  # ---- the authors' procedure in torch (+ faiss IVF)
  torch = _util.optional("torch")
  faiss = _util.optional("faiss")
  t_theirs = None
  if torch is not None and faiss is not None:
    torch.set_num_threads(os.cpu_count() or 1)
    t_theirs = {}
    t0 = time.perf_counter()
    ftr = torch.from_numpy(tr.feats)
    tl = torch.from_numpy(labels.astype(np.int64))
    protos_t = torch.stack([ftr[tl == j].mean(0) for j in range(c)])
    ood_t = protos_t.mean(0)
    t_theirs["prototypes"] = time.perf_counter() - t0

    def grad_one(h, t):
      p = ood_t.clone().requires_grad_(True)
      s = -torch.linalg.vector_norm(h[None] - torch.cat([protos_t, p[None]]), dim=1)
      loss = torch.logsumexp(s, 0) - s[t]
      return torch.autograd.grad(loss, p)[0]

    allf = np.concatenate([tr.feats[keep]] + [v.feats for v in scored.values()])
    allt = np.concatenate([preds[keep]] + [v.logits.argmax(1) for v in scored.values()])
    sub = min(args.subset, len(allf))
    idx = np.random.default_rng(0).choice(len(allf), sub, replace=False)
    t0 = time.perf_counter()
    for i in idx:
      grad_one(torch.from_numpy(allf[i]), int(allt[i]))
    t_theirs["gradients"] = (time.perf_counter() - t0) * len(allf) / sub
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    bank_np = L.batched_grads(tr.feats[keep], np.asarray(protos_t), np.asarray(ood_t), preds[keep])
    t0 = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank_np.shape[1]), bank_np.shape[1],
                               max(1, int(round(4 * math.sqrt(n_bank / 128)))))
    index.train(bank_np); index.add(bank_np); index.nprobe = 4
    for v in scored.values():
      index.search(L.batched_grads(v.feats, np.asarray(protos_t), np.asarray(ood_t),
                                   v.logits.argmax(1)), 1)
    t_theirs["search"] = time.perf_counter() - t0     # includes our grads of the queries (tiny)

  rows = []
  total_ours = t_feat + sum(t_ours.values())
  for stage in ("features", "prototypes", "gradients", "search"):
    r = {"stage": stage, "ours_s": t_feat if stage == "features" else t_ours[stage]}
    r["ours_share"] = r["ours_s"] / total_ours
    if t_theirs is not None:
      r["theirs_s"] = t_feat if stage == "features" else t_theirs[stage]
    rows.append(r)
  total = {"stage": "total", "ours_s": total_ours, "ours_share": 1.0}
  if t_theirs is not None:
    total_theirs = t_feat + sum(t_theirs.values())
    for r in rows:
      r["theirs_share"] = r["theirs_s"] / total_theirs
    total.update(theirs_s=total_theirs, theirs_share=1.0)
    total["speedup"] = total_theirs / total_ours
    post = sum(t_theirs.values()) / sum(t_ours.values())
  rows.append(total)
  payload = {"benchmark": NAME, "quick": args.quick, "machine": _util.machine(),
             "model": model_desc, "n_bank": n_bank, "n_scored": n_scored,
             "n_train": len(tr.feats), "feature_dim": int(tr.feats.shape[1]),
             "torch_loop_extrapolated_from": args.subset if t_theirs else None,
             "speedup_after_features": post if t_theirs is not None else None,
             "rows": rows}
  print(_util.table(rows, ["stage", "ours_s", "ours_share", "theirs_s", "theirs_share",
                           "speedup"]))
  if t_theirs is not None:
    print(f"speed-up excluding the shared feature stage: {post:.1f}x")
  path = _util.save(NAME, payload, args.out)
  plot(rows, _util.plot_path(NAME, args.out))
  print(f"wrote {path}")


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  stages = [r for r in rows if r["stage"] != "total"]
  fig, ax = plt.subplots(figsize=(6, 3))
  for y, key in enumerate(k for k in ("ours_s", "theirs_s") if k in stages[0]):
    left = 0.0
    for r in stages:
      ax.barh(y, r[key], left=left, label=r["stage"] if y == 0 else None,
              color=f"C{stages.index(r)}")
      left += r[key]
  ax.set_yticks(range(2 if "theirs_s" in stages[0] else 1))
  ax.set_yticklabels(["ours (JAX)", "authors' procedure (torch + faiss IVF)"][:len(ax.get_yticks())])
  ax.set_xscale("symlog"); ax.set_xlabel("seconds"); ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
