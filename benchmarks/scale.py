"""Scale: GROOD, KNN and Energy end to end on a generated image set of growing size N.

The train set is generated deterministically batch by batch (`GeneratedImages`: block b of
4096 images comes from seed (seed, b)), never materialised whole: the library reads it through
`features.extract_to_files`, which streams features and logits into memory-mapped .npy files
(the path the scoring harness's feature cache takes for large sets). The ID test and OOD test
sets have a fixed size. Each N runs in a fresh worker process, which reports its peak resident
memory (VmHWM: file pages of the memory maps that were resident count too) and the stage
times; images/s = N / (train features + fits + scoring). A line a + b N is fitted to the peak
RSS: b (bytes per train image) is what grows with N, against D (= feature_dim) float32 = 4 D
bytes per copy of the (N, D) features.

Model: a randomly initialised SmallCNN (timings and memory do not depend on the weights; the
OOD quality does, so no AUROC is reported). Detectors through the library: `energy`,
`knn` (k = 1: its fit keeps the L2-normalised (N, D) bank) and `grood` (source="protomean":
class prototypes from the train features, then the bank of per-sample gradients of the
correctly classified train samples, searched by the exact kNN).

  python benchmarks/scale.py [--sizes 10000,100000,1000000] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _util

NAME = "scale"
BLOCK = 4096
SHAPE = (28, 28, 1)


class GeneratedImages:
  """N uint8 images (28x28x1) of `num_classes` classes, generated block by block from
  (seed, block) on every read: `images[a:b]` returns numpy, nothing is kept. A bright square
  whose position encodes the class, on uniform noise; `labels` (int32, N) is the one N-sized
  array it holds. `kind="ood"`: two squares at random positions (no class)."""

  def __init__(self, n: int, *, num_classes: int = 10, seed: int = 0, kind: str = "id"):
    self.n, self.num_classes, self.seed, self.kind = int(n), int(num_classes), int(seed), kind
    self.shape = (self.n,) + SHAPE
    self.dtype = np.dtype(np.uint8)
    self.labels = (np.arange(self.n, dtype=np.int64) * 7 % self.num_classes).astype(np.int32)

  def __len__(self) -> int:
    return self.n

  def _block(self, b: int) -> np.ndarray:
    lo, hi = b * BLOCK, min((b + 1) * BLOCK, self.n)
    rng = np.random.default_rng([self.seed, b, 0 if self.kind == "id" else 1])
    x = rng.integers(0, 90, (hi - lo,) + SHAPE, dtype=np.uint8)
    if self.kind == "id":
      y = self.labels[lo:hi]
      for c in range(self.num_classes):
        r, q = divmod(c % 16, 4)
        x[y == c, 7 * r:7 * r + 7, 7 * q:7 * q + 7] += 150
    else:
      for j in range(2):
        pos = rng.integers(0, 21, (hi - lo, 2))
        for i, (r, q) in enumerate(pos):
          x[i, r:r + 7, q:q + 7] = np.minimum(x[i, r:r + 7, q:q + 7].astype(np.int32) + 120,
                                              255).astype(np.uint8)
    return x

  def __getitem__(self, rows):
    if not isinstance(rows, slice):
      raise TypeError("GeneratedImages supports slices only")
    start, stop, step = rows.indices(self.n)
    if step != 1:
      raise TypeError("GeneratedImages supports contiguous slices only")
    if stop <= start:
      return np.zeros((0,) + SHAPE, np.uint8)
    parts = []
    for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
      blk = self._block(b)
      lo = b * BLOCK
      parts.append(blk[max(start, lo) - lo:min(stop, lo + len(blk)) - lo])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def worker(args: dict) -> dict:
  """One N in this (fresh) process: features streamed to .npy memmaps, fit, score."""
  import jax
  from flax import nnx
  from grood_jax import features
  from grood_jax.detectors import Context, Split, make_detector
  from grood_jax.modelfns import ModelFns
  from grood_jax.models.cnn import SmallCNN

  n, d, c = int(args["n"]), int(args["feature_dim"]), int(args["num_classes"])
  bs = int(args["batch_size"])
  rss0 = _util.peak_rss_bytes()
  fns = ModelFns(SmallCNN(num_classes=c, width=int(args["width"]), feature_dim=d,
                          rngs=nnx.Rngs(0)))
  mean, std = 0.3, 0.3
  tmp = tempfile.mkdtemp(prefix="grood-scale-", dir=args.get("tmp"))
  times = {}
  try:
    train_src = GeneratedImages(n, num_classes=c, seed=0)
    t = time.perf_counter()
    f = features.extract_to_files(fns, fns.params, train_src,
                                  {"feats": os.path.join(tmp, "train.feats.npy"),
                                   "logits": os.path.join(tmp, "train.logits.npy")},
                                  mean=mean, std=std, batch_size=bs)
    times["train_features_s"] = time.perf_counter() - t
    rss_features = _util.peak_rss_bytes()
    train = Split("train", f.feats, f.logits, images=None, labels=train_src.labels)
    t = time.perf_counter()
    test_sets = {}
    for name, src in (("id_test", GeneratedImages(args["n_test"], num_classes=c, seed=1)),
                      ("ood", GeneratedImages(args["n_test"], num_classes=c, seed=2,
                                              kind="ood"))):
      g = features.extract(fns, fns.params, src, mean=mean, std=std, batch_size=bs)
      test_sets[name] = Split(name, g.feats, g.logits, images=None)
    times["test_features_s"] = time.perf_counter() - t
    ctx = Context(fns=fns, params=fns.params, mean=mean, std=std, train=train, batch_size=256)
    dets = {"energy": {}, "knn": {"k": 1}, "grood": {"source": "protomean"}}
    rss_det = {}
    for name, params in dets.items():
      det = make_detector(name, **params)
      t = time.perf_counter()
      state = det.fit(ctx)
      times[f"{name}_fit_s"] = time.perf_counter() - t
      t = time.perf_counter()
      for split in test_sets.values():
        s = np.asarray(det.score(ctx, state, split))
        assert np.isfinite(s).all(), name
      times[f"{name}_score_s"] = time.perf_counter() - t
      del state
      rss_det[name] = _util.peak_rss_bytes()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  total = (times["train_features_s"] + sum(v for k, v in times.items()
                                            if k.endswith(("_fit_s", "_score_s"))))
  return {"n": n, "feature_dim": d, "num_classes": c, "n_test": int(args["n_test"]),
          "batch_size": bs, "device": str(jax.devices()[0].device_kind),
          "peak_rss_bytes": _util.peak_rss_bytes(), "rss_after_import_bytes": rss0,
          "rss_after_train_features_bytes": rss_features, "rss_after_detector_bytes": rss_det,
          "images_per_s": n / total, "train_features_images_per_s": n / times["train_features_s"],
          "seconds": times, "total_s": total}


def fit_growth(rows: list[dict]) -> dict:
  """Least-squares peak_rss = a + b N over the rows (b: bytes per train image)."""
  n = np.asarray([r["n"] for r in rows], np.float64)
  y = np.asarray([r["peak_rss_bytes"] for r in rows], np.float64)
  if len(rows) < 2:
    return {"a_bytes": float(y[0]), "b_bytes_per_image": None}
  b, a = np.polyfit(n, y, 1)
  d = rows[0]["feature_dim"]
  return {"a_bytes": float(a), "b_bytes_per_image": float(b),
          "b_in_feature_copies": float(b / (4 * d)),
          "note": f"b / (4 D) = copies of the (N, D={d}) float32 features that grow with N"}


def plot(rows, growth, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = np.asarray([r["n"] for r in rows], np.float64)
  rss = np.asarray([r["peak_rss_bytes"] for r in rows]) / 2**20
  ips = np.asarray([r["images_per_s"] for r in rows])
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  a1.plot(n, rss, "o-", label="peak RSS (measured)")
  if growth.get("b_bytes_per_image") is not None:
    nn = np.linspace(n.min(), n.max(), 50)
    a1.plot(nn, (growth["a_bytes"] + growth["b_bytes_per_image"] * nn) / 2**20, "--",
            label=f"fit {growth['a_bytes'] / 2**20:.0f} MiB + "
                  f"{growth['b_bytes_per_image']:.0f} B x N")
  a1.set_xscale("log")
  a1.set_xlabel("train images N")
  a1.set_ylabel("peak host RSS (MiB)")
  a1.legend(fontsize=8)
  a1.grid(alpha=0.3)
  a2.plot(n, ips, "o-", label="end to end (features + fits + scores)")
  a2.plot(n, [r["train_features_images_per_s"] for r in rows], "s--", label="train features")
  a2.set_xscale("log")
  a2.set_xlabel("train images N")
  a2.set_ylabel("images / s")
  a2.legend(fontsize=8)
  a2.grid(alpha=0.3)
  d = rows[0]
  fig.suptitle(f"GROOD + KNN + Energy, generated 28x28 images, D={d['feature_dim']}, "
               f"C={d['num_classes']}, {d['device']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
  p.add_argument("--quick", action="store_true", help="two tiny sizes (a smoke run)")
  p.add_argument("--feature-dim", type=int, default=64)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--n-test", type=int, default=2000)
  p.add_argument("--batch-size", type=int, default=1024)
  p.add_argument("--tmp", help="where the memory-mapped features go (default: $TMPDIR)")
  p.add_argument("--out")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))), flush=True)
    return 0
  sizes = [2000, 5000] if args.quick else [int(s) for s in args.sizes.split(",")]
  n_test = 500 if args.quick else args.n_test
  rows = []
  for n in sizes:
    row = _util.run_worker(os.path.abspath(__file__), {
        "n": n, "feature_dim": args.feature_dim, "width": args.width,
        "num_classes": args.num_classes, "n_test": n_test, "batch_size": args.batch_size,
        "tmp": args.tmp}, timeout=7200)
    rows.append(row)
    _util.save(NAME, {"benchmark": NAME, "partial": True, "rows": rows}, args.out)  # so far
    print(f"N={n}: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"{row['images_per_s']:.0f} images/s end to end "
          f"({row['train_features_images_per_s']:.0f} features), {row['total_s']:.1f}s",
          flush=True)
  growth = fit_growth(rows)
  payload = {"benchmark": NAME, "machine": _util.machine(), "rows": rows, "growth": growth,
             "settings": {"sizes": sizes, "feature_dim": args.feature_dim, "width": args.width,
                          "num_classes": args.num_classes, "n_test": n_test,
                          "batch_size": args.batch_size,
                          "detectors": ["energy", "knn(k=1)", "grood(source=protomean)"]}}
  path = _util.save(NAME, payload, args.out)
  plot(rows, growth, _util.plot_path(NAME, args.out))
  print(f"fit: peak RSS = {growth['a_bytes'] / 2**20:.0f} MiB + "
        f"{growth.get('b_bytes_per_image') or 0:.0f} B x N; wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
