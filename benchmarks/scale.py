"""Scale: GROOD, KNN and Energy end to end on an image set of growing size N, in two forms.

generated: the train set is generated deterministically batch by batch (`GeneratedImages`:
block b of 4096 images comes from seed (seed, b)), never materialised whole.
jpeg: the same images written once with PIL as greyscale JPEG files (one sub-folder per class)
into a temporary folder, then read back through the `folder:` loader (`sources.load_folder`):
streamed through grain (`streaming.StreamedImages`, --decode-workers threads decoding ahead;
--stream on by default here, since these sets are under `streaming.STREAM_MIN_BYTES`, the
size from which `folder:` streams by itself), so the decode path is what is measured.

Either way the library reads the train set through `features.extract_to_files`, which streams
features and logits into memory-mapped .npy files (the path the scoring harness's feature
cache takes for large sets). The ID test and OOD test sets have a fixed size (generated, or
JPEG folders like the train set). Each N runs in a fresh worker process, which reports its
peak resident memory (VmHWM: file pages of the memory maps that were resident count too) and
the stage times; images/s = N / (folder opening + train features + fits + scoring). A line
a + b N is fitted to the peak RSS of each series: b (bytes per train image) is what grows with
N, against D (= feature_dim) float32 = 4 D bytes per copy of the (N, D) features.

Model: a randomly initialised SmallCNN (timings and memory do not depend on the weights; the
OOD quality does, so no AUROC is reported). Detectors through the library, in score.py's
order: `grood` (source="protomean": class prototypes from the train features, then the bank of
per-sample gradients of the correctly classified train samples, searched by the exact kNN),
`knn` (k = 1: its fit places the L2-normalised (N, D) bank on the device) and `energy`; the
train logits are dropped once no detector still to run reads them, as the harness does.

  python benchmarks/scale.py [--sizes 10000,100000] [--jpeg-sizes 10000,30000] [--quick]
                             [--stream on|off|auto] [--decode-workers 8] [--out DIR]
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


def write_jpeg_folder(root: str, src: GeneratedImages, *, labelled: bool = True,
                      quality: int = 90) -> int:
  """Writes the images of `src` as JPEG files (PIL, greyscale): one sub-folder per class
  (c00, c01, ...: sorted order = class index, what `folder:` reads as labels) or, unlabelled,
  all in `root`. Returns the bytes written."""
  from PIL import Image
  total = 0
  for start in range(0, len(src), BLOCK):
    x = src[start:start + BLOCK]
    for i, img in enumerate(x):
      j = start + i
      d = os.path.join(root, f"c{int(src.labels[j]):02d}") if labelled else root
      if not os.path.isdir(d):
        os.makedirs(d, exist_ok=True)
      path = os.path.join(d, f"{j:07d}.jpg")
      Image.fromarray(img[..., 0], "L").save(path, quality=quality)
      total += os.path.getsize(path)
  return total


def write_jpeg_sets(root: str, n: int, *, n_test: int, num_classes: int,
                    quality: int = 90) -> dict:
  """train (N, labelled), id_test (labelled) and ood (unlabelled) folders under `root`, the
  same generated images as the in-memory case."""
  t = time.perf_counter()
  sizes = {"train": write_jpeg_folder(os.path.join(root, "train"),
                                      GeneratedImages(n, num_classes=num_classes, seed=0),
                                      quality=quality),
           "id_test": write_jpeg_folder(os.path.join(root, "id_test"),
                                        GeneratedImages(n_test, num_classes=num_classes, seed=1),
                                        quality=quality),
           "ood": write_jpeg_folder(os.path.join(root, "ood"),
                                    GeneratedImages(n_test, num_classes=num_classes, seed=2,
                                                    kind="ood"),
                                    labelled=False, quality=quality)}
  return {"bytes": sizes, "write_s": time.perf_counter() - t}


DETECTORS = {"grood": {"source": "protomean"}, "knn": {"k": 1}, "energy": {}}   # score.py order


def fit_and_score_all(ctx, train, test_sets: dict, times: dict) -> dict:
  """Fits and scores every detector in DETECTORS' order; the train logits are dropped once no
  detector still to run reads them (`Detector.uses_train_logits`, as the harness does).
  Returns the peak RSS after each detector."""
  from grood_jax.detectors import make_detector
  dets = [(name, make_detector(name, **params)) for name, params in DETECTORS.items()]
  rss_det = {}
  for i, (name, det) in enumerate(dets):
    if not any(getattr(d, "uses_train_logits", True) for _, d in dets[i:]):
      train.logits = None           # scoring.release_train_logits: ctx.train is `train`
    t = time.perf_counter()
    state = det.fit(ctx)
    times[f"{name}_fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for split in test_sets.values():
      sc = np.asarray(det.score(ctx, state, split))
      assert np.isfinite(sc).all(), name
    times[f"{name}_score_s"] = time.perf_counter() - t
    del state
    rss_det[name] = _util.peak_rss_bytes()
  return rss_det


def _stream_flag(v: str):
  return {"on": True, "off": False, "auto": None}[v]


def worker(args: dict) -> dict:
  """One N in this (fresh) process: features streamed to .npy memmaps, fit, score.
  args["source"]: "generated" (GeneratedImages in memory) or "jpeg" (the JPEG folders under
  args["jpeg_root"] read through the `folder:` loader, `sources.load_folder`)."""
  import jax
  from flax import nnx
  from grood_jax import features
  from grood_jax.detectors import Context, Split
  from grood_jax.modelfns import ModelFns
  from grood_jax.models.cnn import SmallCNN

  n, d, c = int(args["n"]), int(args["feature_dim"]), int(args["num_classes"])
  bs = int(args["batch_size"])
  kind = args.get("source", "generated")
  rss0 = _util.peak_rss_bytes()
  fns = ModelFns(SmallCNN(num_classes=c, width=int(args["width"]), feature_dim=d,
                          rngs=nnx.Rngs(0)))
  mean, std = 0.3, 0.3
  tmp = tempfile.mkdtemp(prefix="grood-scale-", dir=args.get("tmp"))
  times = {}
  extra = {}
  try:
    if kind == "jpeg":
      from grood_jax.data.sources import load_folder
      root, stream = args["jpeg_root"], _stream_flag(args.get("stream", "on"))
      workers = int(args.get("decode_workers", 8))
      t = time.perf_counter()
      sets = {k: load_folder(os.path.join(root, k), image_shape=SHAPE, stream=stream,
                             workers=workers) for k in ("train", "id_test", "ood")}
      times["open_s"] = time.perf_counter() - t       # listing + header checks (streamed)
      assert len(sets["train"]) == n, (len(sets["train"]), n)
      train_src, labels = sets["train"].images, sets["train"].labels
      test_srcs = {"id_test": sets["id_test"].images, "ood": sets["ood"].images}
      extra["streamed"] = {k: bool(v.streamed) for k, v in sets.items()}
      extra["decode_workers"] = workers
      extra["rss_after_open_bytes"] = _util.peak_rss_bytes()
    else:
      train_src = GeneratedImages(n, num_classes=c, seed=0)
      labels = train_src.labels
      test_srcs = {"id_test": GeneratedImages(args["n_test"], num_classes=c, seed=1),
                   "ood": GeneratedImages(args["n_test"], num_classes=c, seed=2, kind="ood")}
    t = time.perf_counter()
    f = features.extract_to_files(fns, fns.params, train_src,
                                  {"feats": os.path.join(tmp, "train.feats.npy"),
                                   "logits": os.path.join(tmp, "train.logits.npy")},
                                  mean=mean, std=std, batch_size=bs)
    times["train_features_s"] = time.perf_counter() - t
    if hasattr(train_src, "stats"):
      st = train_src.stats()
      extra["decode_stats"] = {"max_ahead": st["max_ahead"], "threads": len(st["threads"]),
                               "prefetch": train_src.prefetch}
    rss_features = _util.peak_rss_bytes()
    train = Split("train", f.feats, f.logits, images=None, labels=labels)
    del f
    t = time.perf_counter()
    test_sets = {}
    for name, src in test_srcs.items():
      g = features.extract(fns, fns.params, src, mean=mean, std=std, batch_size=bs)
      test_sets[name] = Split(name, g.feats, g.logits, images=None)
    times["test_features_s"] = time.perf_counter() - t
    ctx = Context(fns=fns, params=fns.params, mean=mean, std=std, train=train, batch_size=256)
    rss_det = fit_and_score_all(ctx, train, test_sets, times)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  total = (times.get("open_s", 0.0) + times["train_features_s"]
           + sum(v for k, v in times.items() if k.endswith(("_fit_s", "_score_s"))))
  return {"source": kind, "n": n, "feature_dim": d, "num_classes": c,
          "n_test": int(args["n_test"]), "batch_size": bs,
          "device": str(jax.devices()[0].device_kind),
          "peak_rss_bytes": _util.peak_rss_bytes(), "rss_after_import_bytes": rss0,
          "rss_after_train_features_bytes": rss_features, "rss_after_detector_bytes": rss_det,
          "images_per_s": n / total, "train_features_images_per_s": n / times["train_features_s"],
          "seconds": times, "total_s": total, **extra}


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


SERIES = {"generated": ("generated in memory", "o"), "jpeg": ("JPEG folder (folder:)", "s")}


def plot(series: dict, path):
  """series: {source: (rows, growth)}; RSS and images/s against N, one line per source."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
  first = None
  for kind, (rows, growth) in series.items():
    if not rows:
      continue
    first = first or rows[0]
    label, marker = SERIES[kind]
    n = np.asarray([r["n"] for r in rows], np.float64)
    rss = np.asarray([r["peak_rss_bytes"] for r in rows]) / 2**20
    line, = a1.plot(n, rss, marker + "-", label=f"{label}: peak RSS")
    if growth.get("b_bytes_per_image") is not None:
      nn = np.linspace(n.min(), n.max(), 50)
      a1.plot(nn, (growth["a_bytes"] + growth["b_bytes_per_image"] * nn) / 2**20, "--",
              color=line.get_color(),
              label=f"fit {growth['a_bytes'] / 2**20:.0f} MiB + "
                    f"{growth['b_bytes_per_image']:.0f} B x N")
    line, = a2.plot(n, [r["images_per_s"] for r in rows], marker + "-",
                    label=f"{label}: end to end")
    a2.plot(n, [r["train_features_images_per_s"] for r in rows], marker + ":",
            color=line.get_color(), label=f"{label}: train features"
            + (" (decode + CNN)" if kind == "jpeg" else ""))
  for a, yl in ((a1, "peak host RSS (MiB)"), (a2, "images / s")):
    a.set_xscale("log")
    a.set_xlabel("train images N")
    a.set_ylabel(yl)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
  if first is not None:
    fig.suptitle(f"GROOD + KNN + Energy end to end, 28x28 images, D={first['feature_dim']}, "
                 f"C={first['num_classes']}, {first['device']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _sizes(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="10000,30000,100000,300000,1000000",
                 help="N of the generated in-memory case ('' for none)")
  p.add_argument("--jpeg-sizes", default="10000,30000,100000",
                 help="N of the JPEG-folder case ('' for none)")
  p.add_argument("--quick", action="store_true", help="tiny sizes of both cases (a smoke run)")
  p.add_argument("--feature-dim", type=int, default=64)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--n-test", type=int, default=2000)
  p.add_argument("--batch-size", type=int, default=1024)
  p.add_argument("--stream", choices=("on", "off", "auto"), default="on",
                 help="JPEG folders: streamed through grain (on, the default here), decoded "
                      "whole (off), or streamed from streaming.STREAM_MIN_BYTES on (auto)")
  p.add_argument("--decode-workers", type=int, default=8,
                 help="JPEG folders: grain decode threads (load_folder(workers=))")
  p.add_argument("--jpeg-quality", type=int, default=90)
  p.add_argument("--tmp", help="where the memory-mapped features and the JPEG folders go "
                               "(default: $TMPDIR)")
  p.add_argument("--out")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))), flush=True)
    return 0
  cond = _util.Conditions(note="peak RSS is robust to load; images/s are not")
  sizes = [2000, 5000] if args.quick else _sizes(args.sizes)
  jpeg_sizes = [1000, 2000] if args.quick else _sizes(args.jpeg_sizes)
  n_test = 500 if args.quick else args.n_test
  base = {"feature_dim": args.feature_dim, "width": args.width, "num_classes": args.num_classes,
          "n_test": n_test, "batch_size": args.batch_size, "tmp": args.tmp}
  series = {"generated": [], "jpeg": []}

  def report():
    payload = {"benchmark": NAME, "machine": _util.machine(), "rows": series["generated"],
               "jpeg_rows": series["jpeg"],
               "growth": fit_growth(series["generated"]) if series["generated"] else {},
               "jpeg_growth": fit_growth(series["jpeg"]) if series["jpeg"] else {},
               "settings": {"sizes": sizes, "jpeg_sizes": jpeg_sizes, **{k: v for k, v in
                            base.items() if k != "tmp"},
                            "detectors": [f"{k}({', '.join(f'{a}={b}' for a, b in v.items())})"
                                          for k, v in DETECTORS.items()],
                            "stream": args.stream, "decode_workers": args.decode_workers,
                            "jpeg_quality": args.jpeg_quality,
                            "stream_min_bytes": _stream_min_bytes()}}
    return payload

  for kind, ns in (("generated", sizes), ("jpeg", jpeg_sizes)):
    for n in ns:
      wargs = {**base, "n": n, "source": kind}
      jpeg_dir = None
      try:
        if kind == "jpeg":
          jpeg_dir = tempfile.mkdtemp(prefix="grood-scale-jpeg-", dir=args.tmp)
          written = write_jpeg_sets(jpeg_dir, n, n_test=n_test, num_classes=args.num_classes,
                                    quality=args.jpeg_quality)
          wargs.update(jpeg_root=jpeg_dir, stream=args.stream,
                       decode_workers=args.decode_workers)
        row = _util.run_worker(os.path.abspath(__file__), wargs, timeout=7200)
      finally:
        if jpeg_dir:
          shutil.rmtree(jpeg_dir, ignore_errors=True)
      if kind == "jpeg":
        row["jpeg_bytes"], row["jpeg_write_s"] = written["bytes"], written["write_s"]
      series[kind].append(row)
      _util.save(NAME, {**report(), "partial": True}, args.out)   # so far
      print(f"{kind} N={n}: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"{row['images_per_s']:.0f} images/s end to end "
            f"({row['train_features_images_per_s']:.0f} features), {row['total_s']:.1f}s",
            flush=True)
  payload = _util.finish(report(), cond)
  path = _util.save(NAME, payload, args.out)
  plot({k: (series[k], payload["growth" if k == "generated" else "jpeg_growth"])
        for k in series}, _util.plot_path(NAME, args.out))
  for k, key in (("generated", "growth"), ("jpeg", "jpeg_growth")):
    g = payload[key]
    if g:
      print(f"{k}: peak RSS = {g['a_bytes'] / 2**20:.0f} MiB + "
            f"{g.get('b_bytes_per_image') or 0:.0f} B x N")
  print(f"wrote {path}")
  return 0


def _stream_min_bytes() -> int:
  from grood_jax.data import streaming
  return int(streaming.STREAM_MIN_BYTES)


if __name__ == "__main__":
  sys.exit(main())
