"""Backbone forward (features) images/s: ours against PyTorch, same weights, in one process.

Ours is the jitted function score.py's feature extraction runs (`ModelFns(model).jit_forward`,
called by `features.extract` through `map_arrays`: a numpy batch placed with
`parallel.put_batch`, (early, penultimate, logits) back, blocked on). The torch side is a twin
carrying our weights (`grood_jax.convert.state_dict_of`; the logits are checked against ours
first): the SmallCNN of benchmarks/end_to_end.py and a torchvision-layout ResNet-50 defined
here (torchvision is not needed), in `torch.inference_mode()`, returning the same three
tensors, once with NCHW tensors (PyTorch's default) and once with the model and input in
channels-last memory format.

Cases: the default SmallCNN (the configs' width 16, feature_dim 128; 28x28x1) at batch 128 and
256, and ResNet-50 (224x224x3, 1000 classes) at batch 16. Each thread count runs in its own
process (XLA's CPU thread pool is fixed when JAX starts): with 1 thread the process is pinned
to one core (`sched_setaffinity`, before JAX starts: XLA sizes its pool from the affinity
mask) and torch runs 1 thread; with 2 threads neither is pinned and torch runs 2 threads.
Timings: one warm-up call each (compilation), then --rounds rounds, the three sides
interleaved in every round; medians. A call runs `calls` batches (about 0.3 s of work).
ratio_nchw = torch NCHW images/s / ours, ratio_cl = torch channels-last / ours (above 1:
torch is faster).

  python benchmarks/forward.py [--quick] [--rounds 3] [--threads 1 2] [--out DIR]
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

NAME = "forward"

FULL_CASES = [("smallcnn", 128), ("smallcnn", 256), ("resnet50", 16)]
QUICK_CASES = [("smallcnn", 32)]


def torch_resnet50(torch, model):
  """A torchvision-layout ResNet-50 (v1.5, stride on the 3x3) with our model's weights."""
  from grood_jax.convert import state_dict_of
  nn, F = torch.nn, torch.nn.functional

  class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      cout = planes * 4
      self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return F.relu((x if self.downsample is None else self.downsample(x)) + y)

  sd = state_dict_of(model, shortcut="downsample")
  width, cin = sd["conv1.weight"].shape[:2]
  classes = sd["fc.weight"].shape[0]

  class ResNet50(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      c, stages = width, []
      for i, n in enumerate((3, 4, 6, 3)):
        blocks = []
        for j in range(n):
          blocks.append(Bottleneck(c, width * 2**i, 2 if (i > 0 and j == 0) else 1))
          c = width * 2**i * 4
        stages.append(nn.Sequential(*blocks))
      self.layer1, self.layer2, self.layer3, self.layer4 = stages
      self.fc = nn.Linear(c, classes)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
      e = self.layer1(x)
      h = self.layer4(self.layer3(self.layer2(e))).mean((2, 3))
      return e, h, self.fc(h)

  return _util.load_torch_twin(ResNet50(), sd, "torch ResNet-50")


def build(torch, arch):
  """(our model, the torch twin, fwd(net, x) -> (e, h, logits), image shape)."""
  from flax import nnx
  if arch == "smallcnn":
    from benchmarks.end_to_end import torch_twin
    from grood_jax.models.cnn import SmallCNN
    model = SmallCNN(num_classes=10, in_channels=1, width=16, feature_dim=128, rngs=nnx.Rngs(0))
    net = torch_twin(torch, model)

    def fwd(net, x):
      f, (e, _, h) = net(x, return_feature_list=True)
      return e, h, f
    return model, net, fwd, (28, 28, 1)
  if arch == "resnet50":
    from grood_jax.models.resnet import ResNet50
    model = ResNet50(num_classes=1000, in_channels=3, rngs=nnx.Rngs(0))
    net = torch_resnet50(torch, model)
    return model, net, lambda net, x: net(x), (224, 224, 3)
  raise ValueError(arch)


def worker(args):
  threads = args["threads"]
  if threads == 1 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # before JAX starts
  import jax
  import torch
  from grood_jax import parallel
  from grood_jax.modelfns import ModelFns
  torch.set_num_threads(threads)
  rows = []
  for arch, batch in args["cases"]:
    import copy
    model, net, fwd, shape = build(torch, arch)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    fns = ModelFns(model)
    x = np.random.default_rng(0).standard_normal((batch,) + shape, dtype=np.float32)
    x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)

    def ours():
      return fns.jit_forward(fns.params, parallel.put_batch(x))

    def torch_nchw():
      with torch.inference_mode():
        return fwd(net, x_nchw)

    def torch_cl():
      with torch.inference_mode():
        return fwd(net_cl, x_cl)

    e, h, f = jax.block_until_ready(ours())
    tf = torch_nchw()[2].numpy()
    logit_diff = float(np.max(np.abs(np.asarray(f) - tf)) / (np.max(np.abs(tf)) + 1e-12))
    feat_diff = float(np.max(np.abs(np.asarray(h) - torch_nchw()[1].numpy())))
    cl_diff = float(np.max(np.abs(torch_cl()[2].numpy() - tf)))
    t0 = time.perf_counter()          # one call's time sets how many batches a timed call runs
    torch_nchw()
    calls = max(1, min(20, int(round(args["target_s"] / max(time.perf_counter() - t0, 1e-4)))))
    rep = lambda fn: (lambda: [fn() for _ in range(calls)][-1])
    sec = _util.interleaved({"ours": rep(ours), "torch_nchw": rep(torch_nchw),
                             "torch_cl": rep(torch_cl)}, reps=args["rounds"], warmup=1)
    ips = {k: calls * batch / v for k, v in sec.items()}
    rows.append({"model": arch, "batch": batch, "threads": threads,
                 "torch_threads": torch.get_num_threads(), "batches_per_call": calls,
                 "ours_img_s": ips["ours"], "torch_nchw_img_s": ips["torch_nchw"],
                 "torch_cl_img_s": ips["torch_cl"],
                 "ratio_nchw": ips["torch_nchw"] / ips["ours"],
                 "ratio_cl": ips["torch_cl"] / ips["ours"],
                 "ratio_best_torch": max(ips["torch_nchw"], ips["torch_cl"]) / ips["ours"],
                 "logits_rel_diff": logit_diff, "feats_max_abs_diff": feat_diff,
                 "cl_logits_max_abs_diff": cl_diff})
    del net, net_cl, model, fns
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="SmallCNN at batch 32, one round")
  ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; quick 1)")
  ap.add_argument("--threads", type=int, nargs="+", default=None,
                  help="thread counts, one process each (default 1 2; quick: 1)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  if _util.optional("torch") is None:
    raise SystemExit("benchmarks/forward.py compares against PyTorch: pip install -r "
                     "requirements-bench.txt")
  threads = args.threads or ([1] if args.quick else [1, 2])
  rounds = args.rounds or (1 if args.quick else 3)
  cases = QUICK_CASES if args.quick else FULL_CASES
  cond = _util.Conditions(torch_threads=" / ".join(map(str, threads)) + " (one process each, "
                          "= the JAX pool's cores)")
  rows = []
  for n in threads:
    got = _util.run_worker(os.path.abspath(__file__),
                           {"threads": n, "cases": cases, "rounds": rounds,
                            "target_s": 0.05 if args.quick else 0.3}, timeout=3600)
    rows += got
    print(_util.table(got, ["model", "batch", "threads", "ours_img_s", "torch_nchw_img_s",
                            "torch_cl_img_s", "ratio_nchw", "ratio_cl"]), flush=True)
  payload = {"benchmark": NAME, "quick": args.quick, "machine": _util.machine(),
             "rounds": rounds,
             "note": "ratio_* = torch images/s / ours (above 1: torch faster); one process per "
                     "thread count, 1 thread = pinned to one core; sides interleaved per round",
             "rows": rows}
  print(_util.table(rows, ["model", "batch", "threads", "ours_img_s", "torch_nchw_img_s",
                           "torch_cl_img_s", "ratio_nchw", "ratio_cl", "logits_rel_diff"]))
  _util.finish(payload, cond)
  path = _util.save(NAME, payload, args.out)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [f"{r['model']}\nb{r['batch']} t{r['threads']}" for r in rows]
  xs = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.2))
  for i, (k, lab) in enumerate([("ours_img_s", "ours (jit_forward)"),
                                ("torch_nchw_img_s", "torch NCHW"),
                                ("torch_cl_img_s", "torch channels-last")]):
    ax.bar(xs + (i - 1) * 0.27, [r[k] for r in rows], 0.27, label=lab)
  ax.set_xticks(xs, labels, fontsize=7)
  ax.set_yscale("log"); ax.set_ylabel("images / s")
  ax.set_title("backbone forward (features), CPU" + ("  [LOADED]" if payload["loaded"] else ""))
  ax.legend(fontsize=7)
  fig.tight_layout(); fig.savefig(_util.plot_path(NAME, args.out), dpi=100); plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
