"""Data-parallel training steps/s on 1, 2 and 4 devices (`training.train_state.make_train_step(..., mesh=mesh)`).

One fresh subprocess per device count, with `jax_num_cpu_devices` set before JAX starts. On a
CPU host the "devices" are virtual and share the same cores, so this measures the overhead of
the sharded step (collectives, partitioning), not a speed-up; on real accelerators run it with
the real device count. The single-device library step (`training.make_train_step`) is timed
in the 1-device process beside the DP step (ratio dp/library in one process).
Model: SmallCNN (width 32; 8 in --quick) on random 28x28x1 images, cross-entropy, adamw.

  python benchmarks/train_step.py [--quick] [--out DIR] [--devices 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _util

NAME = "train_step"


def worker(args):
  import jax
  jax.config.update("jax_num_cpu_devices", args["devices"])
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from grood_jax import parallel
  from grood_jax.models.cnn import SmallCNN
  from grood_jax.training.train_state import make_train_step

  def ce(model, x, y):
    logits = model(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), logits

  def fresh():
    model = SmallCNN(num_classes=10, in_channels=1, width=args["width"], rngs=nnx.Rngs(0))
    model.train()
    return nnx.split((model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)))

  rng = np.random.default_rng(0)
  bs = args["batch"]
  xs = [rng.standard_normal((bs, 28, 28, 1), dtype=np.float32) for _ in range(4)]
  ys = [rng.integers(0, 10, bs).astype(np.int32) for _ in range(4)]
  mesh = parallel.make_mesh()
  out = {"devices": len(jax.devices())}

  def rate(step, state, place):
    state = place(state)
    for i in range(2):                                          # compile + warm
      state, loss, _ = step(state, xs[i % 4], ys[i % 4])
    jax.block_until_ready(state)
    t = time.perf_counter()
    for i in range(args["steps"]):
      state, loss, _ = step(state, xs[i % 4], ys[i % 4])
    jax.block_until_ready((state, loss))
    return args["steps"] / (time.perf_counter() - t)

  g, st = fresh()
  out["dp_steps_per_s"] = rate(make_train_step(g, ce, mesh=mesh), st,
                               lambda s: parallel.replicate(s, mesh))
  if args["devices"] == 1:
    g, st = fresh()
    out["library_steps_per_s"] = rate(make_train_step(g, ce), st, lambda s: s)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  cond = _util.Conditions(torch_threads=None)
  steps, batch, width = (3, 16, 8) if args.quick else (50, 128, 32)
  rows = []
  for n in args.devices:
    r = _util.run_worker(os.path.abspath(__file__), {"devices": n, "steps": steps,
                                                     "batch": batch, "width": width})
    r["batch"], r["width"] = batch, width
    rows.append(r)
    print(_util.table([r], list(r)), flush=True)
  base = rows[0]["dp_steps_per_s"]
  for r in rows:
    r["rel_to_first"] = r["dp_steps_per_s"] / base
  payload = {"benchmark": NAME, "quick": args.quick, "machine": _util.machine(),
             "note": "CPU virtual devices share the host's cores: this is sharding overhead, "
                     "not speed-up; each device count in its own process",
             "steps_timed": steps, "rows": rows}
  print(_util.table(rows, ["devices", "batch", "dp_steps_per_s", "library_steps_per_s",
                           "rel_to_first"]))
  _util.finish(payload, cond)
  path = _util.save(NAME, payload, args.out)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.bar([str(r["devices"]) for r in rows], [r["dp_steps_per_s"] for r in rows])
  ax.set_xlabel("CPU virtual devices"); ax.set_ylabel("train steps / s")
  ax.set_title(f"SmallCNN, global batch {batch}")
  fig.tight_layout(); fig.savefig(_util.plot_path(NAME, args.out), dpi=100); plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
