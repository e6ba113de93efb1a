"""GROOD end to end on `fashion_mnist_6v4`: what `score.py` runs against the reference's own
procedure (the first author's OpenOOD `grood.py`, re-expressed in PyTorch + faiss), each side
with its own feature extraction, in one process, at both OOD sources (`oodval`, `mixup`).

Reference side (PyTorch SmallCNN carrying our checkpoint's weights, moved with the public
`grood_jax.convert.state_dict_of`; the logits are checked against ours first). Its passes, as
OpenOOD's Evaluator drives the postprocessor (loader batches of 200, OpenOOD's default):
  prototypes_pass  the backbone over the whole train set (grad mode on, as in `setup`),
                   running class means of the penultimate and the mix-up-layer features
  ood_prototype    oodval: the backbone over OOD-validation batches until >= 100 rows;
                   mixup: the backbone over the first train batch, then ONE intermediate
                   forward per sample from the mix-up layer (lam 0.5, runner-up class
                   prototype); the reference's per-sample diagnostic prints are left out
  bank_pass        the backbone over the train set AGAIN; per batch the NCP cross-entropy over
                   the C+1 prototypes and one `torch.autograd.grad(loss[i], [p_ood, P],
                   retain_graph=True)` per correctly classified sample; faiss IndexIVFFlat,
                   nlist = int(4 sqrt(min(600, int(0.8 n_batches)))), trained on the first
                   batches, the rest added (the batch at the switch is dropped, as there);
                   nprobe 4
  score_passes     the backbone over ID test and every OOD test set, one autograd.grad per
                   sample (all of them), index.search(k=1) per batch
  accuracy_pass    the Evaluator's eval_acc: a plain classifier forward over ID test
Ours: exactly the calls `score_prepared` makes for one GROOD row (FeatureCache: features of
every split score.py extracts, once, cached in memory; GROOD.fit: prototypes, p_ood, the bank
by the closed-form gradient; GROOD.score: gradients + exact `knn_search`; GROOD.predict).

Stages compared (ratio = reference / ours):
  fit       ref prototypes_pass + ood_prototype + bank_pass;  ours features of the splits fit
            reads (train; + the OOD-val half with oodval) + GROOD.fit
  score     ref score_passes;  ours features of ID test + OOD tests + GROOD.score
  accuracy  ref accuracy_pass;  ours GROOD.predict + accuracy (from cached features)
  other     ours only: features score.py extracts that this GROOD row does not read
            (ID val, noise, the OOD-val halves it does not use)
Timings: one untimed warm-up round (JIT compilation, torch/faiss start-up; its times are kept
as `cold`), then medians over --rounds, the four pipelines interleaved within each round.
torch runs with --torch-threads threads (default 1; faiss OpenMP the same); JAX uses its
default CPU thread pool. --loop-fraction f < 1 times the per-sample autograd loop on the first
ceil(f n) samples of each batch and extrapolates (the rest gets the closed form, untimed).

  python benchmarks/end_to_end.py --ckpt /work/runs/6v4_s0 [--quick] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _util

NAME = "end_to_end"
SOURCES = ("oodval", "mixup")
REF_BATCH = 200          # OpenOOD Evaluator's default batch size
N_OOD = 100              # the reference's n_noise_samples / our n_ood


# ----------------------------------------------------------------------------- data, models


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
  if not isinstance(model, SmallCNN):
    raise SystemExit(f"the torch twin exists for SmallCNN only, got {type(model).__name__}")
  if args.quick:                                   # the first `limit` images of every split
    from grood_jax.data.base import OODSet
    cut = lambda s: None if s is None else s.subset(np.arange(min(args.limit, len(s))))
    bench = dataclasses.replace(
        bench, id_train=cut(bench.id_train), id_val=cut(bench.id_val),
        id_test=cut(bench.id_test), ood_val=cut(bench.ood_val), noise=cut(bench.noise),
        ood=[OODSet(o.name, o.group, cut(o.data)) for o in bench.ood])
  return bench, model, model_desc


def torch_twin(torch, model):
  """A PyTorch SmallCNN with our model's weights (grood_jax.convert.state_dict_of)."""
  from grood_jax.convert import state_dict_of
  nn, F = torch.nn, torch.nn.functional
  sd = state_dict_of(model)
  w, cin = sd["conv1.weight"].shape[:2]
  d, c = sd["conv5.weight"].shape[0], sd["fc.weight"].shape[0]

  class TorchSmallCNN(nn.Module):
    def __init__(self):
      super().__init__()
      conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, bias=False)
      self.conv1, self.bn1 = conv(cin, w), nn.BatchNorm2d(w)
      self.conv2, self.bn2 = conv(w, w), nn.BatchNorm2d(w)
      self.conv3, self.bn3 = conv(w, 2 * w), nn.BatchNorm2d(2 * w)
      self.conv4, self.bn4 = conv(2 * w, 2 * w), nn.BatchNorm2d(2 * w)
      self.conv5, self.bn5 = conv(2 * w, d), nn.BatchNorm2d(d)
      self.fc = nn.Linear(d, c)

    def block1(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      return F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)

    def block2(self, e):
      x = F.relu(self.bn3(self.conv3(e)))
      return F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)

    def tail(self, z):
      return F.relu(self.bn5(self.conv5(z))).mean((2, 3))

    def forward(self, x, return_feature_list=False):
      e = self.block1(x)
      b = self.block2(e)
      h = self.tail(b)
      f = self.fc(h)
      return (f, [e, b, h]) if return_feature_list else f

    def intermediate_forward(self, e):            # from the mix-up layer (block1 = early)
      h = self.tail(self.block2(e))
      return self.fc(h), h

  # eval mode; the parameters keep requires_grad, as in the reference
  return _util.load_torch_twin(TorchSmallCNN(), sd, "torch twin")


def to_torch(torch, images_u8, mean, std):
  """uint8 NHWC -> normalised float NCHW (what the reference's loader hands the model)."""
  x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float().div_(255)
  m = torch.tensor(np.atleast_1d(mean), dtype=torch.float32).view(1, -1, 1, 1)
  s = torch.tensor(np.atleast_1d(std), dtype=torch.float32).view(1, -1, 1, 1)
  return ((x - m) / s).contiguous()


def loader(images, labels, bs=REF_BATCH):
  for s in range(0, len(images), bs):
    yield images[s:s + bs], None if labels is None else labels[s:s + bs]


# ----------------------------------------------------------------------------- the reference


def reference_run(torch, faiss, net, bench, aux_val, source, *, loop_fraction=1.0):
  """The reference's procedure; returns ({stage: s}, {work kind: s or count}, check values)."""
  F = torch.nn.functional
  mean, std, C = bench.mean, bench.std, bench.num_classes
  stages, work = {}, defaultdict(float)
  batch = lambda imgs: to_torch(torch, imgs, mean, std)

  def forward(x, feats=True):
    t = time.perf_counter()
    out = net(x, return_feature_list=feats)
    work["forward_s"] += time.perf_counter() - t
    return out

  train_x, train_y = bench.id_train.images, np.asarray(bench.id_train.labels)
  n_batches = math.ceil(len(train_x) / REF_BATCH)
  n_samples = 1.0 * n_batches                          # sampling_ratio 1

  # -- pass 1: class prototypes (penultimate and mix-up layer), running means per class
  t0 = time.perf_counter()
  protos = pre_protos = counts = None
  for idx, (xb, yb) in enumerate(loader(train_x, train_y)):
    x, y = batch(xb), torch.from_numpy(yb.astype(np.int64))
    _, fl = forward(x)
    pre = fl[0].detach().reshape(len(x), -1)
    h = fl[-1].detach().reshape(len(x), -1)
    if protos is None:
      protos = torch.zeros(C, h.shape[1])
      pre_protos = torch.zeros(C, pre.shape[1])
      counts = torch.zeros(C, dtype=torch.long)
    for cl in y.unique():
      m = y == cl
      n = m.sum()
      pre_protos[cl] = (pre[m].sum(0) + counts[cl] * pre_protos[cl]) / (counts[cl] + n)
      protos[cl] = (h[m].sum(0) + counts[cl] * protos[cl]) / (counts[cl] + n)
      counts[cl] += n
    if idx >= n_samples:
      break
  stages["prototypes_pass"] = time.perf_counter() - t0

  # -- the OOD prototype
  t0 = time.perf_counter()
  noise, count = torch.zeros(protos.shape[1]), 0

  def update(f):
    nonlocal noise, count
    noise = (f.sum(0) + count * noise) / (count + len(f))
    count += len(f)

  with torch.no_grad():
    if source == "oodval":
      for xb, _ in loader(aux_val.images, None):
        x = batch(xb)
        _, fl = forward(x)
        update(fl[-1].reshape(len(x), -1))
        if count >= N_OOD:
          break
    else:                                              # mixup: first train batch, per sample
      for xb, _ in loader(train_x, None):
        x = batch(xb)
        logits, fl = forward(x)
        c2 = torch.topk(logits, 2, dim=1).indices[:, 1]
        pre = fl[0].clone()
        shape = (1,) + tuple(pre.shape[1:])
        mixed = torch.zeros_like(fl[-1])
        t = time.perf_counter()
        for i in range(len(x)):
          z = 0.5 * pre[i].unsqueeze(0) + 0.5 * pre_protos[c2[i]].view(shape)
          _, hm = net.intermediate_forward(z)
          mixed[i] = hm.reshape_as(mixed[i])
        work["mixup_loop_s"] += time.perf_counter() - t
        update(mixed.reshape(len(x), -1))
        if count >= N_OOD:
          break
  stages["ood_prototype"] = time.perf_counter() - t0

  # -- the per-sample gradients (the reference's _compute_grad, autograd path)
  def compute_grad(x, y=None):
    with torch.enable_grad():
      protos.requires_grad_(True)
      noise.requires_grad_(True)
      logits, fl = forward(x)
      pseudo = logits.argmax(1).view(-1).long()
      h = fl[-1]
      P = torch.cat([protos, noise.view(1, -1)], dim=0)
      vec = h.reshape(len(x), 1, -1).detach() - P
      s = -torch.norm(vec, dim=2)
      loss = F.cross_entropy(s, pseudo, reduction="none")
      ncc_preds = s[:, :-1].argmax(1)
      rows = [i for i in range(len(x)) if y is None or int(y[i]) == int(pseudo[i])]
      m = len(rows) if loop_fraction >= 1 else max(1, math.ceil(loop_fraction * len(rows)))
      m = min(m, len(rows))
      grads = []
      t = time.perf_counter()
      for i in rows[:m]:
        g = torch.autograd.grad(loss[i], [noise, protos], retain_graph=True)
        gradients = g[0].data.view(1, -1)
        _ = g[1].data[pseudo[i]].view(1, -1)         # the use_pseudo_prototype gradient
        grads.append(gradients)
      dt = time.perf_counter() - t
      work["autograd_calls_timed"] += m
      work["autograd_calls"] += len(rows)
      work["autograd_loop_s"] += dt * (len(rows) / m if m else 0.0)
      extra = dt * (len(rows) / m - 1.0) if m else 0.0
      untimed = 0.0
      if m < len(rows):                                # closed form for the rest, untimed
        t = time.perf_counter()
        with torch.no_grad():
          idx = torch.tensor(rows[m:])
          pi = s[idx].softmax(-1)[:, -1:]
          grads.append(pi * F.normalize(vec[idx, -1, :]))
        untimed = time.perf_counter() - t
      protos.requires_grad_(False)
      noise.requires_grad_(False)
      out = torch.cat(grads, 0).detach().numpy() if grads else np.zeros((0, protos.shape[1]),
                                                                         np.float32)
      return np.ascontiguousarray(out, np.float32), ncc_preds, extra - untimed

  # -- pass 2: the gradient bank in a faiss IVF index
  t0 = time.perf_counter()
  adjust = 0.0
  dim = protos.shape[1]
  train_index_samples = min(600, int(n_samples * 0.8))
  nlist = max(1, int(4 * math.sqrt(train_index_samples)))
  index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
  collected, trained, n_bank = [], False, 0
  for idx, (xb, yb) in enumerate(loader(train_x, train_y)):
    g, _, a = compute_grad(batch(xb), yb)
    adjust += a
    t = time.perf_counter()
    if trained:
      index.add(g)
      n_bank += len(g)
    elif idx >= train_index_samples:
      allg = np.concatenate(collected, axis=0)
      index.train(allg)
      index.add(allg)
      n_bank += len(allg)
      trained = True
    else:
      collected.append(g)
    work["faiss_s"] += time.perf_counter() - t
    if idx >= n_samples:
      break
  if not trained:                  # fewer batches than the switch point: the reference fails
    raise SystemExit(f"reference: {n_batches} train batches never reach the index switch at "
                     f"{train_index_samples}; use more train images")
  index.nprobe = 4
  stages["bank_pass"] = time.perf_counter() - t0 + adjust

  # -- scoring passes: ID test and every OOD test set
  t0 = time.perf_counter()
  adjust = 0.0
  scores = {}
  sets = [("id_test", bench.id_test.images)] + [(o.name, o.data.images) for o in bench.ood]
  n_scored = 0
  for name, imgs in sets:
    out = []
    for xb, _ in loader(imgs, None):
      g, _, a = compute_grad(batch(xb))
      adjust += a
      t = time.perf_counter()
      dists, _ = index.search(g, 1)
      work["faiss_s"] += time.perf_counter() - t
      out.append(-dists[:, -1])
      n_scored += len(g)
    scores[name] = np.concatenate(out)
  stages["score_passes"] = time.perf_counter() - t0 + adjust

  # -- the Evaluator's accuracy pass: a plain classifier forward over ID test
  t0 = time.perf_counter()
  preds = []
  with torch.no_grad():
    for xb, _ in loader(bench.id_test.images, None):
      preds.append(forward(batch(xb), feats=False).argmax(1).numpy())
  acc = float((np.concatenate(preds) == np.asarray(bench.id_test.labels)).mean())
  stages["accuracy_pass"] = time.perf_counter() - t0

  work = dict(work)
  work["autograd_calls"] = int(work["autograd_calls"])
  work["autograd_calls_timed"] = int(work["autograd_calls_timed"])
  info = dict(n_bank=n_bank, n_scored=n_scored, nlist=nlist, accuracy=acc,
              train_index_batches=train_index_samples, auroc=_aurocs(scores))
  return stages, work, info


def _aurocs(scores):
  from grood_jax import metrics
  return {k: float(metrics.auroc(scores["id_test"], v)) for k, v in scores.items()
          if k != "id_test"}


# ----------------------------------------------------------------------------- ours


def ours_run(fns, bench, source, seed=0, batch_size=512):
  """The calls score_prepared makes for one GROOD row (see its code in grood_jax/scoring.py)."""
  from grood_jax import metrics
  from grood_jax.detectors import Context, make_detector
  from grood_jax.scoring import FeatureCache, split_ood_val
  params = fns.params
  feat = {}

  def split(cache, data, key):
    t = time.perf_counter()
    s = cache.split(data)
    feat[key] = feat.get(key, 0.0) + time.perf_counter() - t
    return s

  t_all = time.perf_counter()
  cache = FeatureCache(fns, params, mean=bench.mean, std=bench.std, batch_size=batch_size)
  train = split(cache, bench.id_train, "fit")
  id_test = split(cache, bench.id_test, "score")
  ood = [(o.name, split(cache, o.data, "score")) for o in bench.ood]
  aux, sel = split_ood_val(bench.ood_val, seed)
  aux_val = split(cache, aux, "fit" if source == "oodval" else "other")
  split(cache, sel, "other")
  noise = split(cache, bench.noise, "other") if bench.noise is not None else None
  id_val = split(cache, bench.id_val, "other") if bench.id_val is not None else None
  ctx = Context(fns=fns, params=params, mean=bench.mean, std=bench.std, train=train,
                ood_val=aux_val, noise=noise, seed=seed, batch_size=min(batch_size, 256),
                id_val=id_val)
  stages = {}
  det = make_detector("grood", source=source)
  t = time.perf_counter()
  state = det.fit(ctx)
  stages["grood_fit"] = time.perf_counter() - t
  t = time.perf_counter()
  s_id = np.asarray(det.score(ctx, state, id_test))
  auroc = {name: float(metrics.auroc(s_id, np.asarray(det.score(ctx, state, s))))
           for name, s in ood}
  stages["grood_score"] = time.perf_counter() - t
  t = time.perf_counter()
  acc = float(metrics.accuracy(np.asarray(det.predict(ctx, state, id_test)), id_test.labels))
  metrics.accuracy(id_test.logits.argmax(-1), id_test.labels)
  stages["grood_predict"] = time.perf_counter() - t
  for k in ("fit", "score", "other"):
    stages[f"features_{k}"] = feat.get(k, 0.0)
  stages["wall"] = time.perf_counter() - t_all
  info = dict(n_bank=int(len(state["bank"])), accuracy=acc, auroc=auroc,
              n_scored=len(id_test) + sum(len(s) for _, s in ood))
  return stages, info


# ----------------------------------------------------------------------------- main


def compare(ref, ours):
  """The comparable stages (see the module docstring): {stage: (reference_s, ours_s)}."""
  r = {"fit": ref["prototypes_pass"] + ref["ood_prototype"] + ref["bank_pass"],
       "score": ref["score_passes"], "accuracy": ref["accuracy_pass"], "other": 0.0}
  o = {"fit": ours["features_fit"] + ours["grood_fit"],
       "score": ours["features_score"] + ours["grood_score"],
       "accuracy": ours["grood_predict"], "other": ours["features_other"]}
  r["total"], o["total"] = sum(r.values()), sum(o.values())
  return {k: (r[k], o[k]) for k in r}


def median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--ckpt", default=None, help="a training work directory (else a random model)")
  ap.add_argument("--quick", action="store_true", help="the first --limit images of every split")
  ap.add_argument("--limit", type=int, default=512, help="images per split with --quick")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
  ap.add_argument("--torch-threads", type=int, default=1,
                  help="torch (and faiss) threads; 0 = the core count, as JAX's CPU pool")
  ap.add_argument("--loop-fraction", type=float, default=1.0,
                  help="time the per-sample autograd loop on this fraction of each batch and "
                       "extrapolate (1 = every call timed)")
  ap.add_argument("--subset", type=int, default=None, help=argparse.SUPPRESS)  # old flag
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  torch, faiss = _util.optional("torch"), _util.optional("faiss")
  if torch is None or faiss is None:
    raise SystemExit("end_to_end.py needs torch and faiss-cpu (pip install -r "
                     "requirements-bench.txt): the reference side is the comparison")
  threads = _util.set_torch_threads(args.torch_threads)
  faiss.omp_set_num_threads(threads)
  cond = _util.Conditions(torch_threads=threads,
                          note=f"faiss OpenMP threads {threads}; JAX: default CPU thread pool")
  mach = _util.machine()
  from grood_jax.modelfns import ModelFns

  bench, model, model_desc = load(args)
  fns = ModelFns(model)
  net = torch_twin(torch, model)
  x = bench.id_test.images[:64]
  from grood_jax.features import extract
  ours_logits = extract(fns, fns.params, x, mean=bench.mean, std=bench.std, batch_size=64).logits
  with torch.no_grad():
    twin_logits = net(to_torch(torch, x, bench.mean, bench.std)).numpy()
  twin_err = float(np.abs(ours_logits - twin_logits).max())
  print(f"torch twin vs ours, max |logit difference| on 64 ID test images: {twin_err:.2e}")
  if twin_err > 1e-3 * max(1.0, float(np.abs(ours_logits).max())):
    raise SystemExit("the torch twin does not reproduce our model's logits")
  from grood_jax.scoring import split_ood_val
  aux_val, _ = split_ood_val(bench.ood_val, 0)

  runs = {(side, s): [] for side in ("reference", "ours") for s in args.sources}
  cold, infos = {}, {}
  for rnd in range(args.rounds + 1):
    tag = "warm-up (untimed)" if rnd == 0 else f"round {rnd}/{args.rounds}"
    for s in args.sources:
      st, work, info = reference_run(torch, faiss, net, bench, aux_val, s,
                                     loop_fraction=args.loop_fraction)
      rec = {**st, **{f"work_{k}": v for k, v in work.items()}}
      infos[("reference", s)] = info
      ost, oinfo = ours_run(fns, bench, s)
      infos[("ours", s)] = oinfo
      if rnd == 0:
        cold[("reference", s)], cold[("ours", s)] = rec, ost
      else:
        runs[("reference", s)].append(rec)
        runs[("ours", s)].append(ost)
      tot = compare(st, ost)["total"]
      print(f"{tag} {s}: reference {tot[0]:.2f}s, ours {tot[1]:.2f}s "
            f"(load {os.getloadavg()[0]:.1f})", flush=True)

  med = {k: {key: median([r[key] for r in v]) for key in v[0]} for k, v in runs.items()}
  rows, detail = [], []
  for s in args.sources:
    ref, ours = med[("reference", s)], med[("ours", s)]
    for stage, (r, o) in compare(ref, ours).items():
      rows.append({"source": s, "stage": stage, "reference_s": r, "ours_s": o,
                   "ratio": r / o if o > 0 else None})
    detail.append({"source": s, "side": "reference", **ref})
    detail.append({"source": s, "side": "ours", **ours})
  totals = {s: next(r["ratio"] for r in rows if r["source"] == s and r["stage"] == "total")
            for s in args.sources}
  ref_info = {s: infos[("reference", s)] for s in args.sources}
  ours_info = {s: infos[("ours", s)] for s in args.sources}
  payload = {
      "benchmark": NAME, "quick": args.quick, "limit": args.limit if args.quick else None,
      "machine": mach, "model": model_desc, "rounds": args.rounds,
      "torch_threads": threads, "faiss_threads": threads, "loop_fraction": args.loop_fraction,
      "autograd_loop": ("every per-sample autograd.grad call timed" if args.loop_fraction >= 1
                        else f"timed on {args.loop_fraction:g} of each batch, extrapolated"),
      "torch_twin_max_abs_logit_diff": twin_err,
      "n_train": len(bench.id_train), "ref_batch": REF_BATCH,
      "timing": ("medians over rounds after one untimed warm-up round; reference and ours, "
                 "both sources, interleaved in each round; ratio = reference / ours"),
      "stages": {"fit": "ref prototypes_pass + ood_prototype + bank_pass; ours features of "
                        "the splits fit reads + GROOD.fit",
                 "score": "ref score_passes; ours features of ID test + OOD tests + "
                          "GROOD.score",
                 "accuracy": "ref accuracy_pass (classifier forward); ours GROOD.predict",
                 "other": "ours: features score.py extracts that this row does not read"},
      "ratio_total": totals, "reference_info": ref_info, "ours_info": ours_info,
      "rows": rows, "detail": detail,
      "cold": [{"source": k[1], "side": k[0], **v} for k, v in cold.items()]}
  print()
  print(_util.table(rows, ["source", "stage", "reference_s", "ours_s", "ratio"]))
  print()
  print(_util.table(detail, ["source", "side", "prototypes_pass", "ood_prototype", "bank_pass",
                             "score_passes", "accuracy_pass", "work_forward_s",
                             "work_autograd_loop_s", "work_autograd_calls", "work_faiss_s",
                             "features_fit", "features_score", "features_other", "grood_fit",
                             "grood_score", "grood_predict"]))
  for s in args.sources:
    ri, oi = ref_info[s], ours_info[s]
    print(f"{s}: end to end reference / ours = {totals[s]:.2f}x  (reference: "
          f"{med[('reference', s)]['work_autograd_calls']:.0f} autograd.grad calls, bank "
          f"{ri['n_bank']}, IVF nlist {ri['nlist']}; ours: bank {oi['n_bank']}, exact kNN)")
  print(f"per-sample autograd loop: {payload['autograd_loop']}; torch threads {threads}")
  _util.finish(payload, cond)
  path = _util.save(NAME, payload, args.out)
  plot(rows, args.sources, _util.plot_path(NAME, args.out))
  print(f"wrote {path}")


def plot(rows, sources, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  stages = ["fit", "score", "accuracy", "other"]
  fig, ax = plt.subplots(figsize=(7, 3))
  labels = []
  for y, (s, side) in enumerate((s, side) for s in sources for side in ("reference", "ours")):
    left = 0.0
    for j, st in enumerate(stages):
      v = next(r[f"{side}_s"] for r in rows if r["source"] == s and r["stage"] == st)
      ax.barh(y, v, left=left, color=f"C{j}", label=st if y == 0 else None)
      left += v
    labels.append(f"{side} ({s})")
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels, fontsize=8)
  ax.set_xlabel("seconds")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
