"""The accelerator suite: the benchmarks at accelerator-sized settings, in one run (< 8 min on
a GPU), one JSON with the device's name.

Stages (each timed after a warm-up call, so compilation is reported apart):
  knn        exact `ops.knn_search` (k = 1, re-ranked exactly), a 1.28M x 2048 float32 bank
             (ImageNet-1K train x ResNet-50 features) against 10k queries
  grads      GROOD per-sample gradients (`grood.loss.batched_grads`, wrt the OOD prototype)
             with C = 1000 classes, D = 2048, 100k samples
  features   ResNet-50 (`models.build_model("resnet50")`) penultimate features + logits of
             224x224x3 images at batch 256 (`features.extract`), 4096 images
  scale      GROOD (protomean) + KNN + Energy end to end on 200k generated 28x28 images
             (benchmarks/scale.py's worker, features streamed to memory maps)
`--tiny` runs every stage at toy sizes in seconds on CPU (tests/test_scale.py runs it so the
script keeps working); its figures mean nothing.

  python benchmarks/accelerator_suite.py [--tiny] [--only knn,grads] [--out DIR]

Writes <out>/accelerator_suite.json (default benchmarks/results/; --tiny: accelerator_suite_tiny
.json) with jax.devices()[0].device_kind, the settings and the times of every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _util

FULL = {"knn": dict(bank=1_281_167, dim=2048, queries=10_000, k=1),
        "grads": dict(n=100_000, classes=1000, dim=2048),
        "features": dict(model="resnet50", n=4096, batch=256, size=224, classes=1000),
        "scale": dict(n=200_000, n_test=5000, feature_dim=256, width=16, num_classes=100,
                      batch_size=2048)}
TINY = {"knn": dict(bank=3000, dim=32, queries=100, k=1),
        "grads": dict(n=600, classes=10, dim=32),
        "features": dict(model="cnn", n=64, batch=32, size=28, classes=10),
        "scale": dict(n=1500, n_test=200, feature_dim=16, width=4, num_classes=10,
                      batch_size=256)}


def _wall(fn):
  import jax
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t, out


def stage_knn(s):
  from grood_jax.ops import knn_search
  rng = np.random.default_rng(0)
  bank = rng.standard_normal((s["bank"], s["dim"]), dtype=np.float32)
  q = rng.standard_normal((s["queries"], s["dim"]), dtype=np.float32)
  first, _ = _wall(lambda: knn_search(q[:min(len(q), 1024)], bank, s["k"]))
  secs, (d, _) = _wall(lambda: knn_search(q, bank, s["k"]))
  assert np.isfinite(d).all()
  return {"first_call_s": first, "seconds": secs, "queries_per_s": s["queries"] / secs,
          "distance_gflop": 2e-9 * s["bank"] * s["dim"] * s["queries"],
          "gflop_per_s": 2e-9 * s["bank"] * s["dim"] * s["queries"] / secs}


def stage_grads(s):
  from grood_jax.grood.loss import batched_grads
  rng = np.random.default_rng(1)
  h = rng.standard_normal((s["n"], s["dim"]), dtype=np.float32)
  protos = rng.standard_normal((s["classes"], s["dim"]), dtype=np.float32)
  ood = protos.mean(0)
  t = rng.integers(0, s["classes"], s["n"]).astype(np.int32)
  first, _ = _wall(lambda: batched_grads(h[:4096], protos, ood, t[:4096]))
  secs, g = _wall(lambda: batched_grads(h, protos, ood, t))
  assert g.shape == h.shape and np.isfinite(g).all()
  return {"first_call_s": first, "seconds": secs, "grads_per_s": s["n"] / secs}


def stage_features(s):
  from grood_jax import features
  from grood_jax.modelfns import ModelFns
  from grood_jax.models import build_model
  fns = ModelFns(build_model(s["model"], num_classes=s["classes"], in_channels=3))
  rng = np.random.default_rng(2)
  imgs = rng.integers(0, 256, (s["n"], s["size"], s["size"], 3), dtype=np.uint8)
  run = lambda m: features.extract(fns, fns.params, imgs[:m], mean=0.45, std=0.25,  # noqa: E731
                                   batch_size=s["batch"])
  first, _ = _wall(lambda: run(s["batch"]))
  secs, f = _wall(lambda: run(s["n"]))
  assert np.isfinite(f.feats).all()
  return {"first_call_s": first, "seconds": secs, "images_per_s": s["n"] / secs,
          "feature_dim": int(f.feats.shape[1])}


def stage_scale(s):
  from benchmarks import scale
  row = scale.worker({"n": s["n"], "n_test": s["n_test"], "feature_dim": s["feature_dim"],
                      "width": s["width"], "num_classes": s["num_classes"],
                      "batch_size": s["batch_size"], "tmp": tempfile.gettempdir()})
  return {"seconds": row["total_s"], "images_per_s": row["images_per_s"],
          "train_features_images_per_s": row["train_features_images_per_s"],
          "stage_seconds": row["seconds"], "peak_rss_bytes": row["peak_rss_bytes"]}


STAGES = {"knn": stage_knn, "grads": stage_grads, "features": stage_features,
          "scale": stage_scale}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="toy sizes: seconds on CPU (a smoke run)")
  p.add_argument("--only", help="comma-separated stages (default: all of %s)" % ",".join(STAGES))
  p.add_argument("--out")
  args = p.parse_args(argv)
  import jax
  sizes = TINY if args.tiny else FULL
  names = args.only.split(",") if args.only else list(STAGES)
  unknown = sorted(set(names) - set(STAGES))
  if unknown:
    p.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
  dev = jax.devices()[0]
  payload = {"benchmark": "accelerator_suite", "tiny": args.tiny,
             "device_kind": str(getattr(dev, "device_kind", dev.platform)),
             "platform": dev.platform, "device_count": jax.device_count(),
             "machine": _util.machine(), "settings": {n: sizes[n] for n in names}, "stages": {}}
  t0 = time.perf_counter()
  for name in names:
    t = time.perf_counter()
    res = STAGES[name](sizes[name])
    res["stage_wall_s"] = time.perf_counter() - t
    payload["stages"][name] = res
    print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()
                                  if isinstance(v, float)), flush=True)
  payload["total_s"] = time.perf_counter() - t0
  path = _util.save("accelerator_suite_tiny" if args.tiny else "accelerator_suite", payload,
                    args.out)
  print(f"{payload['device_kind']}: {payload['total_s']:.1f}s; wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
