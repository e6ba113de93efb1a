"""The benchmark harness: restore a checkpoint, extract features once, fit and score detectors.

  results, scores = score_checkpoint(ckpt_dir, ScoreOptions(detectors=["grood", "knn"]))

`prepare_checkpoint` restores the model and loads every data set first, so that every user
error is raised before any feature is extracted or any file written; `score_prepared` does
the work. Results carry no wall-clock time (same checkpoint and seed: same results); times
go into a separate `timing` dict.

The backbone runs once per data set (features and logits are cached in memory and, when a
cache directory is given, on disk keyed by the checkpoint's parameters and the images).
Each detector is fitted on the ID training split, then scores the ID test split and every OOD
set. With `select=True`, every point of a detector's search grid is fitted anew and scored on
the ID validation split against the OOD validation set (the half not used by any detector
as auxiliary data); the best AUROC wins. Test OOD sets are never looked at during selection.

Library code: no prints. Log lines go through the `log` callback, progress through the
`progress` callback: `progress(desc, total, unit)` returns a bar with `update(n)` and `close()`
(the command line gives tqdm bars; the default shows nothing). Warnings (an unreadable cache
file recomputed) go through `warnings.warn`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import subprocess
import sys
import time
import warnings
import zipfile
from typing import Callable

import jax
import numpy as np

from grood_jax import metrics, parallel
from grood_jax.data import DataError, ImageSet, OODSet, load_benchmark, load_source
from grood_jax.detectors import Context, Split, make_detector
from grood_jax.errors import DetectorError, OutputError, ScoringError
from grood_jax import features as features_lib
from grood_jax.features import extract
from grood_jax.fileio import atomic_write
from grood_jax.modelfns import ModelFns
from grood_jax.progress import Bar, ProgressFn, no_progress  # noqa: F401  (re-exported)


@dataclasses.dataclass
class ScoreOptions:
  detectors: list[str]
  benchmark: str | None = None            # default: the one the checkpoint was trained on
  extra_ood: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (group, name, spec)
  select: bool = False
  detector_params: dict = dataclasses.field(default_factory=dict)  # name -> {param: value}
  data_dir: str | None = None
  seed: int = 0
  batch_size: int = 512
  cache_dir: str | None = None
  data_options: object | None = None      # e.g. openood.Options, for load_benchmark(options=)




def params_fingerprint(params) -> str:
  """A hash of every parameter array (values, shapes and dtypes): the checkpoint's identity."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(a.shape).encode() + str(a.dtype).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def images_fingerprint(images, rows_per_step: int = 4096) -> str:
  """A hash of an image set's shape and bytes, read `rows_per_step` rows at a time (the same
  digest as hashing the whole array at once), so a streamed set is never held whole."""
  h = hashlib.sha256()
  h.update(str(tuple(images.shape)).encode())
  for start in range(0, len(images), rows_per_step):
    h.update(np.ascontiguousarray(images[start:start + rows_per_step]).tobytes())
  return h.hexdigest()[:16]


class FeatureCache:
  """Features of each image set under one checkpoint, in memory and optionally on disk.

  A cache file that cannot be read (truncated, random bytes, wrong arrays) is a miss: it is
  recomputed and rewritten, with one warning. A failure to write it (disk full, ...) is an
  OutputError saying what to do; no partial file is left under its name.
  """

  def __init__(self, fns: ModelFns, params, *, mean, std, batch_size: int,
               cache_dir: str | None = None, log: Callable[[str], None] | None = None,
               progress: ProgressFn | None = None):
    self.fns, self.params, self.mean, self.std = fns, params, mean, std
    self.batch_size = batch_size
    self.cache_dir = cache_dir
    self.log = log or (lambda s: None)
    self.progress = progress or no_progress
    self.model_key = params_fingerprint(params)
    self._mem: dict[str, Split] = {}
    self.hits = 0
    self.misses = 0

  def _read(self, path: str, n: int):
    """(feats, logits) from a cache file, or None (with one warning when it is unreadable)."""
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as z:
        feats, logits = np.asarray(z["feats"]), np.asarray(z["logits"])
      if (feats.ndim != 2 or logits.ndim != 2 or len(feats) != n or len(logits) != n
          or feats.dtype != np.float32 or logits.dtype != np.float32):
        raise ValueError(f"arrays of shape {feats.shape} / {logits.shape}, expected {n} rows")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      why = " ".join(str(e).split()) or type(e).__name__
      warnings.warn(f"feature cache file {path} is unreadable ({type(e).__name__}: {why[:120]}); "
                    "recomputing it", stacklevel=2)
      return None
    return feats, logits

  def _write(self, path: str, feats, logits) -> None:
    try:
      os.makedirs(self.cache_dir, exist_ok=True)
      atomic_write(path, lambda fh: np.savez(fh, feats=feats, logits=logits))
    except OSError as e:
      raise OutputError(f"cannot write the feature cache {path}: {e.strerror or e} [errno "
                        f"{e.errno}]; free some disk space, choose another --out, or pass "
                        "--no-cache") from e

  def split(self, data: ImageSet) -> Split:
    key = f"{self.model_key}-{images_fingerprint(data.images)}"
    if key in self._mem:
      s = self._mem[key]
      return dataclasses.replace(s, name=data.name)
    path = os.path.join(self.cache_dir, f"feats-{key}.npz") if self.cache_dir else None
    got = self._read(path, len(data)) if path else None
    if not parallel.all_processes(got is not None):   # several processes: all hit, or none
      got = None
    if (got is None and path and len(data) >= features_lib.MEMMAP_MIN_ROWS
        and jax.process_count() == 1):    # a large set: memory-mapped .npy files instead
      bar = self.progress(f"features {data.name}", len(data), "img")
      try:
        f, hit = features_lib.cached_feature_files(
            self.fns, self.params, data.images, self.cache_dir, key, mean=self.mean,
            std=self.std, batch_size=self.batch_size, progress=bar.update)
      finally:
        bar.close()
      if not hit:                         # counted as a hit just below
        self.hits, self.misses = self.hits - 1, self.misses + 1
      got = (f.feats, f.logits)
      path = None                         # nothing more to write
    if got is not None:
      feats, logits = got
      self.hits += 1
    else:
      self.misses += 1
      t0 = time.time()
      bar = self.progress(f"features {data.name}", len(data), "img")
      try:
        f = extract(self.fns, self.params, data.images, mean=self.mean, std=self.std,
                    batch_size=self.batch_size, progress=bar.update)
      finally:
        bar.close()
      feats, logits = f.feats, f.logits
      self.log(f"features of {data.name}: {len(data)} images in {time.time() - t0:.1f}s")
      if path and parallel.is_main_process():    # process 0 writes the cache
        self._write(path, feats, logits)
    s = Split(name=data.name, feats=feats, logits=logits, images=data.images, labels=data.labels)
    self._mem[key] = s
    return s


def _check_scores(name: str, set_name: str, s: np.ndarray) -> np.ndarray:
  """Scores as float64; a ScoringError (not a user error: the input data were checked when
  loaded) when any is NaN or Inf, so that no non-finite score ever reaches a metric."""
  s = np.asarray(s, np.float64)
  bad = ~np.isfinite(s)
  if bad.any():
    raise ScoringError(
        f"detector {name!r} gave {int(bad.sum())} non-finite (NaN/Inf) scores of {len(s)} on "
        f"{set_name!r}: a failure of the model or the detector, not of the input data; check "
        f"the checkpoint and the detector's --param values, or leave {name!r} out")
  return s


def split_ood_val(ood_val: ImageSet, seed: int) -> tuple[ImageSet, ImageSet]:
  """Splits the OOD validation set in two disjoint halves: auxiliary data for detectors that
  use real outliers (GROOD's `oodval` source) and the half that selection scores against."""
  perm = np.random.default_rng(seed).permutation(len(ood_val))
  half = len(perm) // 2
  return (ood_val.subset(np.sort(perm[:half]), ood_val.name + "[aux]"),
          ood_val.subset(np.sort(perm[half:]), ood_val.name + "[select]"))


def fit_and_score(det, ctx: Context, id_split: Split, ood_splits: list[tuple[str, str, Split]],
                  bar: Bar | None = None):
  """Fits one detector and scores the ID split and every OOD split.

  Returns (per-set metrics, {set: scores}, accuracy of the detector's own prediction, seconds).
  `bar` (optional) advances by one after the fit and after each scored split.
  """
  bar = bar or no_progress("", 0)
  t0 = time.time()
  state = det.fit(ctx)
  t_fit = time.time() - t0
  bar.update(1)
  scores = {"id": _check_scores(det.name, id_split.name, det.score(ctx, state, id_split))}
  bar.update(1)
  per_set = {}
  for group, name, split in ood_splits:
    s = _check_scores(det.name, name, det.score(ctx, state, split))
    scores[name] = s
    per_set[name] = {"group": group, **metrics.ood_metrics(scores["id"], s)}
    bar.update(1)
  acc = None
  if id_split.labels is not None:
    acc = float(metrics.accuracy(np.asarray(det.predict(ctx, state, id_split)), id_split.labels))
  return per_set, scores, acc, {"fit_s": t_fit, "score_s": time.time() - t0 - t_fit}


def select_params(name: str, base_params: dict, ctx: Context, id_val: Split, ood_val: Split,
                  log: Callable[[str], None], progress: ProgressFn | None = None):
  """Fits every grid point anew, scores ID val vs OOD val; returns (best params, grid results)."""
  proto = make_detector(name, **base_params)
  points = proto.grid_points()
  grid = []
  best = None
  bar = (progress or no_progress)(f"select {name}", len(points), "point")
  try:
    for point in points:
      det = make_detector(name, **point)
      state = det.fit(ctx)  # refitted for every point: no state is shared across the grid
      s_id = _check_scores(name, id_val.name, det.score(ctx, state, id_val))
      s_ood = _check_scores(name, ood_val.name, det.score(ctx, state, ood_val))
      auc = metrics.auroc(s_id, s_ood)
      grid.append({"params": _jsonable(point), "auroc": float(auc)})
      if best is None or auc > best[1]:
        best = (point, auc)
      bar.update(1)
  finally:
    bar.close()
  log(f"select {name}: {len(grid)} grid points, best AUROC {best[1]:.4f} with "
      f"{ {k: best[0][k] for k in proto.grid} }")
  return best[0], grid


def _jsonable(d: dict) -> dict:
  """A JSON-ready copy of a parameter dict with the keys in sorted order (stable JSON)."""
  return _jsonable_tree({k: d[k] for k in sorted(d)})


def build_sets(bench, extra_ood) -> list[OODSet]:
  sets = list(bench.ood)
  names = {s.name for s in sets}
  h, w, c = bench.image_shape
  for group, name, spec in extra_ood:
    if name in names:
      raise DataError(f"--ood: a set named {name!r} already exists in {bench.name}; pick another name")
    data = load_source(spec, name=name, image_shape=(h, w, c))
    sets.append(OODSet(name=name, group=group, data=data))
    names.add(name)
  return sets


@dataclasses.dataclass
class Prepared:
  """A checkpoint with everything scoring needs, every input already validated."""
  ckpt_dir: str
  model: object
  config: object
  step: int
  bench: object          # grood_jax.data.Benchmark
  ood_sets: list         # list[OODSet]: the benchmark's test OOD sets and the --ood ones


def _check_params_finite(params, ckpt_dir: str) -> None:
  from grood_jax.checkpoint import CheckpointError
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      raise CheckpointError(f"checkpoint {ckpt_dir}: parameter {jax.tree_util.keystr(path)} "
                            "holds NaN/Inf (the training diverged); use an earlier checkpoint "
                            "or retrain with a lower learning rate")


def prepare_checkpoint(ckpt_dir: str, opts: ScoreOptions, *, benchmarks: dict | None = None
                       ) -> Prepared:
  """Restores the model and loads every data set, validating all user input; reads only.

  Every user error (CheckpointError, DataError, DetectorError) is raised here, before any
  feature is extracted or any file written. `benchmarks` caches loaded benchmarks (and their
  extra OOD sets) across checkpoints.
  """
  from grood_jax.checkpoint import load_model

  model, config, step = load_model(ckpt_dir)
  _check_params_finite(ModelFns(model).params, ckpt_dir)
  bench_name = opts.benchmark or config.benchmark
  data_dir = opts.data_dir or config.get("data_dir", None)
  key = (bench_name, data_dir)
  if benchmarks is not None and key in benchmarks:
    bench, ood_sets = benchmarks[key]
  else:
    bench = load_benchmark(bench_name, data_dir=data_dir, options=opts.data_options)
    ood_sets = None
  if int(model.num_classes) != bench.num_classes:
    raise DataError(f"the checkpoint {ckpt_dir} has {model.num_classes} classes but benchmark "
                    f"{bench_name!r} has {bench.num_classes}; pass --benchmark "
                    f"{config.benchmark} (the one it was trained on)")
  if int(getattr(model, "in_channels", bench.image_shape[-1])) != bench.image_shape[-1]:
    raise DataError(f"the model takes {model.in_channels}-channel images but benchmark "
                    f"{bench_name!r} has {bench.image_shape[-1]}")
  if opts.select and bench.ood_val is None:
    raise DataError(f"--select needs an OOD validation set; benchmark {bench.name!r} has none")
  if ood_sets is None:
    ood_sets = build_sets(bench, opts.extra_ood)
    if benchmarks is not None:
      benchmarks[key] = (bench, ood_sets)
  check_detectors(opts, num_train=len(bench.id_train), num_classes=bench.num_classes,
                  feature_dim=feature_dim(ModelFns(model), bench.image_shape))
  return Prepared(ckpt_dir, model, config, int(step), bench, ood_sets)


def detector_rows(opts: ScoreOptions) -> list[str]:
  """The detectors a run scores, in order: the requested ones and, with --select, for `grood`
  (when its source is not fixed by --param) also `grood+oe` (selected the same way over
  real-outlier sources) and `grood[openood]` (the reference's shipped setting), so that the
  outlier-data variants are reported as their own rows, never mixed into `grood`'s selection."""
  names = list(opts.detectors)
  if opts.select and "grood" in names and "source" not in opts.detector_params.get("grood", {}):
    at = names.index("grood") + 1
    extra = [n for n in ("grood+oe", "grood[openood]") if n not in names]
    names[at:at] = extra
  return names


def training_uses_outlier_data(config) -> bool:
  """Whether the checkpoint was trained on real outliers (GReg / GReg+ losses): then every
  detector on it belongs to the outlier-data group. False for configs without a loss."""
  from grood_jax.training.losses import uses_outlier_data
  try:
    return bool(config is not None and "loss" in config and uses_outlier_data(config))
  except (ValueError, KeyError, AttributeError):
    return False


def feature_dim(fns: ModelFns, image_shape) -> int:
  """The penultimate feature size of the model on images of `image_shape`, from shapes only
  (jax.eval_shape: nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
  _, h, _ = jax.eval_shape(fns.forward, fns.params, x)
  return int(np.prod(h.shape[1:]))


def check_detectors(opts: ScoreOptions, *, num_train: int, num_classes: int,
                    feature_dim: int) -> list:
  """Makes every requested detector with its --param values (types and ranges checked) and,
  with `opts.select`, every point of its selection grid, and checks each against the data
  sizes (`Detector.check_data`, e.g. knn.k <= the bank): DetectorError before any work.
  Returns the detectors made with the user's parameters."""
  dets = []
  for name in detector_rows(opts):
    det = make_detector(name, **dict(opts.detector_params.get(name, {})))
    det.check_data(num_train=num_train, num_classes=num_classes, feature_dim=feature_dim)
    dets.append(det)
    if opts.select:
      for point in det.grid_points():
        try:
          make_detector(name, **point).check_data(num_train=num_train, num_classes=num_classes,
                                                  feature_dim=feature_dim)
        except DetectorError as e:
          grid = {k: point[k] for k in det.grid}
          raise DetectorError(f"--select grid point {name} {grid}: {e}") from None
  return dets


def score_checkpoint(ckpt_dir: str, opts: ScoreOptions, *, log: Callable[[str], None] | None = None,
                     timing: dict | None = None, progress: ProgressFn | None = None):
  """Scores every requested detector on one checkpoint. Returns (results dict, scores dict).

  The results hold no wall-clock times, so the same checkpoint, options and seed give the same
  results; the times go into `timing` (a dict filled in place) when one is given.
  """
  return score_prepared(prepare_checkpoint(ckpt_dir, opts), opts, log=log, timing=timing,
                        progress=progress)


def uses_train_logits(name: str, opts: ScoreOptions) -> bool:
  """Whether detector `name` (with its --param values) reads the (N, C) train logits
  (`Detector.uses_train_logits`; True unless the detector declares otherwise)."""
  return bool(make_detector(name, **dict(opts.detector_params.get(name, {}))).uses_train_logits)


def release_train_logits(cache: FeatureCache, ctx: Context) -> None:
  """Drops the train logits from the harness: the train split (ctx.train, the cache's entry)
  keeps its features and labels, its logits become None; freed once nothing else refers to
  them (a memory-mapped cache file is unmapped)."""
  train = ctx.train
  if train is None or train.logits is None:
    return
  logits = train.logits
  for s in (train, *cache._mem.values()):
    if s.logits is logits:
      s.logits = None


def score_prepared(prep: Prepared, opts: ScoreOptions, *,
                   log: Callable[[str], None] | None = None, timing: dict | None = None,
                   progress: ProgressFn | None = None):
  """Extracts features (cached), fits and scores every detector: (results dict, scores dict).

  `progress` gets a bar per feature extraction (images), per detector (fit + each scored set)
  and per selection (grid points)."""
  from grood_jax.stats import group_means

  log = log or (lambda s: None)
  progress = progress or no_progress
  timing = {} if timing is None else timing
  model, step, bench, ckpt_dir = prep.model, prep.step, prep.bench, prep.ckpt_dir
  fns = ModelFns(model)
  params = fns.params
  cache = FeatureCache(fns, params, mean=bench.mean, std=bench.std, batch_size=opts.batch_size,
                       cache_dir=opts.cache_dir, log=log, progress=progress)
  t0 = time.time()
  train = cache.split(bench.id_train)
  id_test = cache.split(bench.id_test)
  ood_splits = [(s.group, s.name, cache.split(s.data)) for s in prep.ood_sets]
  aux_val = sel_val = None
  if bench.ood_val is not None:
    aux, sel = split_ood_val(bench.ood_val, opts.seed)
    aux_val, sel_val = cache.split(aux), cache.split(sel)
  noise = cache.split(bench.noise) if bench.noise is not None else None
  names = detector_rows(opts)
  # the labelled ID validation split: selection scores on it, and detectors that calibrate on ID
  # data only (autofold, grood protos_from="id_val") take it as ctx.id_val
  id_val = cache.split(bench.id_val) if bench.id_val is not None else None
  timing["features_s"] = time.time() - t0

  ctx = Context(fns=fns, params=params, mean=bench.mean, std=bench.std, train=train,
                ood_val=aux_val, noise=noise, seed=opts.seed, batch_size=min(opts.batch_size, 256),
                id_val=id_val, progress=progress)
  classifier_acc = float(metrics.accuracy(id_test.logits.argmax(-1), id_test.labels))

  results = {"benchmark": bench.name, "checkpoint": os.path.abspath(ckpt_dir),
             "checkpoint_step": int(step), "classifier_accuracy": classifier_acc,
             "detectors": {}, "selection": {},
             "meta": {"seed": opts.seed, "num_train": len(train), "num_id_test": len(id_test),
                      "sets": {n: {"group": g, "size": len(s)} for g, n, s in ood_splits},
                      "model_fingerprint": cache.model_key}}
  train_outliers = training_uses_outlier_data(prep.config)
  results["meta"]["training_uses_outlier_data"] = train_outliers
  all_scores = {}
  for i, name in enumerate(names):
    if not any(uses_train_logits(n, opts) for n in names[i:]):
      release_train_logits(cache, ctx)     # no detector still to run reads them
    params_user = dict(opts.detector_params.get(name, {}))
    if aux_val is None and make_detector(name, **params_user).uses_outlier_data():
      log(f"{name}: left out — it uses real outlier data (an OOD validation set) and benchmark "
          f"{bench.name!r} has none")
      continue
    runs = [(name, params_user)]
    select_s = None
    if opts.select and make_detector(name, **params_user).grid:  # no grid: nothing to select
      t_sel = time.time()
      chosen, grid = select_params(name, params_user, ctx, id_val, sel_val, log, progress)
      select_s = time.time() - t_sel
      results["selection"][name] = {"chosen": _jsonable(chosen), "grid": grid,
                                    "id_val": id_val.name, "ood_val": sel_val.name}
      if name == "grood":  # report the authors' setting beside the selected one
        runs = [("grood[default]", params_user), (name, chosen)]
      else:
        runs = [(name, chosen)]
    for label, p in runs:
      det = make_detector(name, **p)
      bar = progress(label, 2 + len(ood_splits), "step")
      try:
        per_set, scores, acc, det_timing = fit_and_score(det, ctx, id_test, ood_splits, bar)
      finally:
        bar.close()
      entry = {"params": _jsonable(det.params), "accuracy": acc, "ood": per_set,
               "outlier_data": bool(det.uses_outlier_data() or train_outliers),
               **group_means(per_set)}
      results["detectors"][label] = entry
      if select_s is not None and label == name:   # the selection's time, beside its row's
        det_timing["select_s"] = select_s
      timing[label] = det_timing
      all_scores[label] = scores
      log(f"{label}: fit {det_timing['fit_s']:.1f}s, score {det_timing['score_s']:.1f}s")
  if not opts.select:
    results.pop("selection")
  return results, all_scores


# --------------------------------------------------------------------------- provenance


def _git(*args: str) -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    r = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return r.stdout.strip() if r.returncode == 0 else None


def provenance(prepared: list[Prepared], argv: list[str] | None = None) -> dict:
  """How a report was made: command line, date, host, device, versions, the grood_jax git
  commit (when it runs from a git checkout), each checkpoint's step and training config.
  Not reproducible by nature: it goes to provenance.json and the HTML, never results.json."""
  import flax
  import grood_jax
  versions = {"grood_jax": grood_jax.__version__, "jax": jax.__version__,
              "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
              "flax": flax.__version__, "numpy": np.__version__,
              "python": platform.python_version()}
  try:
    import optax
    versions["optax"] = optax.__version__
  except ImportError:
    pass
  devices = jax.devices()
  device = {"platform": devices[0].platform, "kind": getattr(devices[0], "device_kind", "?"),
            "count": len(devices), "process_count": jax.process_count()}
  git = None
  commit = _git("rev-parse", "HEAD")
  if commit:
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    git = {"commit": commit, "dirty": bool(dirty)}
  argv = list(sys.argv if argv is None else argv)
  ckpts = []
  for p in prepared:
    cfg = p.config.to_dict() if hasattr(p.config, "to_dict") else dict(p.config or {})
    ckpts.append({"path": os.path.abspath(p.ckpt_dir), "step": int(p.step),
                  "config": _jsonable_tree(cfg)})
  return {"command": " ".join(_shell_quote(a) for a in argv), "argv": argv,
          "cwd": os.getcwd(), "date": datetime.datetime.now(datetime.timezone.utc)
          .isoformat(timespec="seconds"), "host": platform.node(), "device": device,
          "versions": versions, "git": git, "checkpoints": ckpts}


def _shell_quote(a: str) -> str:
  import shlex
  return shlex.quote(str(a))


def _jsonable_tree(x):
  if isinstance(x, dict):
    return {str(k): _jsonable_tree(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable_tree(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  return str(x)
