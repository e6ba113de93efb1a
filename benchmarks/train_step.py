"""Data-parallel training steps/s on 1, 2 and 4 devices (`training.train_state.make_train_step(..., mesh=mesh)`).

One fresh subprocess per device count, with `jax_num_cpu_devices` set before JAX starts. On a
CPU host the "devices" are virtual and share the same cores, so this measures the overhead of
the sharded step (collectives, partitioning), not a speed-up; on real accelerators run it with
the real device count. The single-device library step (`training.make_train_step`) is timed
in the 1-device process beside the DP step (ratio dp/library in one process).
Model: SmallCNN (width 32; 8 in --quick) on random 28x28x1 images, cross-entropy, adamw.

Torch column (`torch_rows`, skipped when torch is not installed or with --no-torch): in one
more 1-device process, the step `train.py` builds for the default config
(`small_cnn_config`: adamw at peak lr 3e-3 on the warmup-cosine schedule, weight decay 5e-4 on
kernels only, cross-entropy; `make_train_step(..., return_metrics=True,
return_grad_norm=True, mesh=training_mesh(config))`, numpy batches in) against a plain
PyTorch loop on the torch SmallCNN twin of benchmarks/end_to_end.py carrying the same initial
weights (`convert.state_dict_of`): NCHW batches prepared beforehand, zero_grad, forward,
`F.cross_entropy`, backward, `torch.optim.AdamW` (weight decay 5e-4 on the ndim > 1
parameters, 0 on the rest) with our schedule's learning rate set each step. Widths 16 (the
configs') and 32, batch 128. torch runs with as many threads as JAX's pool (the core count)
and, as a second column, 1 thread (torch's thread count can change within the process; XLA's
cannot). Each round times 10 steps (2 in --quick) of every side in turn (ours, torch,
torch 1 thread); medians over 3 rounds after 3 warm-up steps each. ratio = torch steps/s /
ours (above 1: torch faster).

  python benchmarks/train_step.py [--quick] [--out DIR] [--devices 1 2 4] [--no-torch]
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


def torch_worker(args):
  """Ours (the step train.py builds for the default config) against a plain PyTorch loop."""
  import jax
  import torch
  from flax import nnx
  from benchmarks.end_to_end import torch_twin
  from grood_jax import parallel
  from grood_jax.models import build_model
  from grood_jax.training import config as config_lib, losses
  from grood_jax.training.loop import training_mesh
  from grood_jax.training.train_state import (create_optimizer, learning_rate_schedule,
                                              make_train_step)
  F = torch.nn.functional
  threads = torch.get_num_threads() if args["torch_threads"] is None else args["torch_threads"]
  rows = []
  bs, steps, rounds = args["batch"], args["steps"], args["rounds"]
  steps_total = (3 + rounds * steps) + 1
  for width in args["widths"]:
    config = config_lib.small_cnn_config("fashion_mnist_6v4")
    config.model.kwargs.width = width
    classes = 6
    model = build_model(config.model.name, num_classes=classes, in_channels=1, seed=config.seed,
                        **dict(config.model.kwargs))
    net = torch_twin(torch, model)            # same initial weights (eval() inside: undo)
    net.train()
    model.train()
    optimizer = nnx.Optimizer(model, create_optimizer(config, steps_total), wrt=nnx.Param)
    mesh = training_mesh(config)
    graphdef, state = nnx.split((model, optimizer))
    state = parallel.replicate(state, mesh)
    step = make_train_step(graphdef, losses.make_loss(config),
                           select_fn=losses.make_aux_selector(config), seed=config.seed,
                           return_metrics=True, return_grad_norm=True, mesh=mesh)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((bs, 28, 28, 1), dtype=np.float32) for _ in range(4)]
    ys = [rng.integers(0, classes, bs).astype(np.int32) for _ in range(4)]
    xts = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in xs]
    yts = [torch.from_numpy(y.astype(np.int64)) for y in ys]
    lrs = np.asarray(learning_rate_schedule(config, steps_total)(np.arange(steps_total)))
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=float(lrs[0]))
    box = {"state": state, "i": 0, "ti": 0}

    def ours(k):
      for _ in range(k):
        i = box["i"]
        box["state"], loss, *_ = step(box["state"], xs[i % 4], ys[i % 4])
        box["i"] += 1
      jax.block_until_ready((box["state"], loss))
      return float(loss)

    def plain_torch(k, n_threads):
      torch.set_num_threads(n_threads)
      for _ in range(k):
        i = box["ti"]
        for g in topt.param_groups:
          g["lr"] = float(lrs[min(i, steps_total - 1)])
        topt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xts[i % 4]), yts[i % 4])
        loss.backward()
        topt.step()
        box["ti"] += 1
      return float(loss)

    sides = {"ours": ours, "torch": lambda k: plain_torch(k, threads),
             "torch_1thread": lambda k: plain_torch(k, 1)}
    first = {}
    for name, fn in sides.items():
      first[name] = fn(3)                                   # compile / warm up
    times = {k: [] for k in sides}
    for _ in range(rounds):
      for name, fn in sides.items():
        t = time.perf_counter()
        fn(steps)
        times[name].append(time.perf_counter() - t)
    med = {k: steps / sorted(v)[len(v) // 2] for k, v in times.items()}
    rows.append({"width": width, "batch": bs, "torch_threads": threads,
                 "ours_steps_per_s": med["ours"], "torch_steps_per_s": med["torch"],
                 "torch_1thread_steps_per_s": med["torch_1thread"],
                 "ratio_torch_over_ours": med["torch"] / med["ours"],
                 "ratio_torch_1thread_over_ours": med["torch_1thread"] / med["ours"],
                 "first_loss_ours": first["ours"], "first_loss_torch": first["torch"],
                 "steps_per_round": steps, "rounds": rounds})
  return {"torch_rows": rows}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
  ap.add_argument("--no-torch", action="store_true", help="skip the torch column")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    w = json.loads(args.worker)
    print(json.dumps(torch_worker(w) if w.get("mode") == "torch" else worker(w)))
    return
  with_torch = not args.no_torch and _util.optional("torch") is not None
  cond = _util.Conditions(torch_threads=_util.set_torch_threads(0) if with_torch else None)
  steps, batch, width = (3, 16, 8) if args.quick else (50, 128, 32)
  rows = []
  for n in args.devices:
    r = _util.run_worker(os.path.abspath(__file__), {"devices": n, "steps": steps,
                                                     "batch": batch, "width": width})
    r["batch"], r["width"] = batch, width
    rows.append(r)
    print(_util.table([r], list(r)), flush=True)
  torch_rows = []
  if with_torch:
    torch_rows = _util.run_worker(os.path.abspath(__file__), {
        "mode": "torch", "widths": [8] if args.quick else [16, 32], "batch": batch,
        "steps": 2 if args.quick else 10, "rounds": 3, "torch_threads": cond.torch_threads},
        timeout=3600)["torch_rows"]
    print(_util.table(torch_rows, ["width", "batch", "torch_threads", "ours_steps_per_s",
                                   "torch_steps_per_s", "torch_1thread_steps_per_s",
                                   "ratio_torch_over_ours", "ratio_torch_1thread_over_ours"]),
          flush=True)
  base = rows[0]["dp_steps_per_s"]
  for r in rows:
    r["rel_to_first"] = r["dp_steps_per_s"] / base
  payload = {"benchmark": NAME, "quick": args.quick, "machine": _util.machine(),
             "note": "CPU virtual devices share the host's cores: this is sharding overhead, "
                     "not speed-up; each device count in its own process",
             "steps_timed": steps, "rows": rows, "torch_rows": torch_rows}
  print(_util.table(rows, ["devices", "batch", "dp_steps_per_s", "library_steps_per_s",
                           "rel_to_first"]))
  _util.finish(payload, cond)
  path = _util.save(NAME, payload, args.out)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2 if torch_rows else 1, figsize=(9 if torch_rows else 5, 3),
                           squeeze=False)
  ax = axes[0, 0]
  ax.bar([str(r["devices"]) for r in rows], [r["dp_steps_per_s"] for r in rows])
  ax.set_xlabel("CPU virtual devices"); ax.set_ylabel("train steps / s")
  ax.set_title(f"SmallCNN, global batch {batch}")
  if torch_rows:
    ax = axes[0, 1]
    xs = np.arange(len(torch_rows))
    for i, (k, lab) in enumerate([("ours_steps_per_s", "ours (train.py step)"),
                                  ("torch_steps_per_s", f"torch, {cond.torch_threads} threads"),
                                  ("torch_1thread_steps_per_s", "torch, 1 thread")]):
      ax.bar(xs + (i - 1) * 0.27, [r[k] for r in torch_rows], 0.27, label=lab)
    ax.set_xticks(xs, [f"width {r['width']}" for r in torch_rows])
    ax.set_ylabel("train steps / s"); ax.legend(fontsize=7)
    ax.set_title(f"vs PyTorch, batch {batch}" + ("  [LOADED]" if payload["loaded"] else ""))
  fig.tight_layout(); fig.savefig(_util.plot_path(NAME, args.out), dpi=100); plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
