"""Score OOD detectors on a trained checkpoint and write the report.

  grood-score --ckpt runs/fmnist6v4          (or: python score.py / python -m grood_jax.cli.score)
  python score.py --ckpt runs/fmnist6v4 --detectors grood,knn --ood far:faces=npz:faces.npz
  python score.py --ckpt runs/fmnist6v4 --detectors all --select --out report/
  python score.py --ckpt runs/s0 runs/s1 runs/s2 --detectors all   # mean ± std over seeds
  python score.py --list-detectors
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

from grood_jax.cli.common import Parser, run_cli


def parse_args(argv=None):
  p = Parser(prog="grood-score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", nargs="+", help="checkpoint directory (a train.py --workdir); several "
                 "give mean ± std")
  p.add_argument("--out", help="report directory (default: <ckpt>/report); created only once "
                 "every input has been checked")
  p.add_argument("--detectors", default="grood,msp,energy,knn",
                 help="comma-separated detector names, or 'all' (default: %(default)s)")
  p.add_argument("--benchmark", help="benchmark name (default: the checkpoint's)")
  p.add_argument("--ood", action="append", default=[], metavar="GROUP:NAME=SOURCE",
                 help="add an OOD set, e.g. far:faces=npz:faces.npz or near:mine=folder:dir/")
  p.add_argument("--param", action="append", default=[], metavar="DETECTOR.KEY=VALUE",
                 help="override a detector parameter, e.g. grood.tau=10 or knn.k=10")
  p.add_argument("--select", action="store_true",
                 help="choose each detector's parameters on ID val vs OOD val (refitting each)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", help="where local data sets live")
  p.add_argument("--data", choices=["openood", "tfds"], default="openood",
                 help="where cifar10/cifar100/imagenet200/imagenet1k are read from (default: %(default)s)")
  p.add_argument("--data-root", help="OpenOOD v1.5 data folder (benchmark_imglist/, images_classic/, "
                 "images_largescale/); default: searched in --data-dir")
  p.add_argument("--max-per-set", type=int, help="seeded random subset of at most N images per set "
                 "(ImageNet-scale sets)")
  p.add_argument("--batch-size", type=int, default=512)
  p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
  p.add_argument("--no-plots", action="store_true", help="tables only (faster)")
  p.add_argument("--list-detectors", action="store_true", help="list detectors and exit")
  p.add_argument("--devices", type=int, default=0,
                 help="spread batches and kNN banks over this many devices (default 0: all)")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() first (multi-host TPU/GPU)")
  p.add_argument("--debug", action="store_true", help="show the traceback of any error")
  return p.parse_args(argv)


def parse_param_overrides(items: list[str]) -> dict:
  from grood_jax.detectors import DetectorError
  out: dict = {}
  for item in items:
    if "=" not in item or "." not in item.split("=", 1)[0]:
      raise DetectorError(f"--param {item!r}: expected DETECTOR.KEY=VALUE, e.g. grood.tau=10")
    lhs, value = item.split("=", 1)
    det, key = lhs.split(".", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a bare string such as mixup
    out.setdefault(det, {})[key] = value
  return out


def list_detectors() -> str:
  from grood_jax.detectors import all_detectors
  lines = []
  for name, cls in all_detectors().items():
    lines.append(f"{name:12s} {cls.description}")
    lines.append(f"{'':12s} defaults: {cls.defaults}")
    if cls.grid:
      lines.append(f"{'':12s} grid:     {cls.grid}")
  return "\n".join(lines)


def main(argv=None) -> int:
  """The command line. Exit status: 0 done, 2 bad input (one line `error: ...` on stderr,
  nothing written), 1 an internal failure (traceback, or one line for a model/detector that
  produced NaN/Inf scores), 130 interrupted. `--debug` shows the traceback of any error."""
  try:
    args = parse_args(argv)
  except SystemExit as e:        # --help (0) or a bad command line (2), already printed
    return e.code if isinstance(e.code, int) else 0
  return run_cli(lambda: run(args), debug=args.debug,
                 interrupted="interrupted; the previous report (if any) is intact")


def run(args) -> int:
  if args.distributed:
    import jax
    jax.distributed.initialize()
  from grood_jax import parallel
  from grood_jax.errors import ConfigError
  try:
    mesh = parallel.mesh_for(args.devices)
  except ValueError as e:
    raise ConfigError(f"--devices {args.devices}: {e}") from None
  with parallel.data_parallel(mesh):       # batches split, banks sharded over the devices
    return _score(args)


def _score(args) -> int:
  from grood_jax.checkpoint import CheckpointError
  from grood_jax.detectors import DetectorError, make_detector, parse_detectors
  from grood_jax.data import parse_ood_spec
  from grood_jax import report
  from grood_jax.scoring import ScoreOptions, prepare_checkpoint, score_prepared

  if args.list_detectors:
    print(list_detectors())
    return 0
  # 1. Check every input before anything is written (and before any slow work).
  if not args.ckpt:
    raise CheckpointError("--ckpt is required (a directory written by train.py --workdir)")
  for c in args.ckpt:
    if not os.path.exists(c):
      raise CheckpointError(f"--ckpt {c}: no such directory; give a train.py --workdir")
    if not os.path.isdir(c):
      raise CheckpointError(f"--ckpt {c}: a file, not a directory; give a train.py --workdir")
  if args.batch_size < 1:
    raise DetectorError(f"--batch-size {args.batch_size}: must be at least 1")
  names = parse_detectors(args.detectors)
  overrides = parse_param_overrides(args.param)
  for det, params in overrides.items():
    if det not in names:
      raise DetectorError(f"--param {det}.*: detector {det!r} is not among --detectors {names}")
    make_detector(det, **params)  # validates parameter names now, before any work
  extra = [parse_ood_spec(s) for s in args.ood]
  from grood_jax.data import openood
  openood.configure(source=args.data, data_root=args.data_root, max_per_set=args.max_per_set)
  out = args.out or os.path.join(args.ckpt[0], "report")
  check_writable(out)            # creates nothing
  opts = ScoreOptions(detectors=names, benchmark=args.benchmark, extra_ood=extra,
                      select=args.select, detector_params=overrides, data_dir=args.data_dir,
                      seed=args.seed, batch_size=args.batch_size,
                      cache_dir=None if args.no_cache else os.path.join(out, "cache"))
  t0 = time.time()
  benchmarks: dict = {}
  prepared = [prepare_checkpoint(c, opts, benchmarks=benchmarks) for c in args.ckpt]

  # 2. Work: the feature cache (--out/cache) is the first thing written.
  log = lambda s: print(f"  {s}", file=sys.stderr, flush=True)  # noqa: E731
  runs, timings = [], []
  for i, prep in enumerate(prepared):
    print(f"[{i + 1}/{len(prepared)}] scoring {prep.ckpt_dir} ...", file=sys.stderr, flush=True)
    timing: dict = {}
    runs.append(score_prepared(prep, opts, log=log, timing=timing))
    timings.append({"checkpoint": os.path.abspath(prep.ckpt_dir), **timing})
  if len(runs) == 1:
    results, scores = runs[0]
  else:
    results = report.aggregate_runs([r for r, _ in runs])
    scores = runs[0][1]
  print(report.format_table(results))
  paths = report.write_report(results, out, scores=None if args.no_plots else scores)
  # Wall-clock times live beside results.json, so that results.json is reproducible.
  timing_doc = {"total_s": time.time() - t0, "runs": timings}
  paths.append(report.write_json(timing_doc, os.path.join(out, "timing.json")))
  print(f"report: {os.path.join(out, 'report.html')} ({len(paths)} files) in "
        f"{time.time() - t0:.1f}s", file=sys.stderr)
  return 0


def check_writable(path: str) -> None:
  """OutputError unless --out is, or can be created as, a writable directory. Creates nothing."""
  from grood_jax.fileio import check_writable_dir
  check_writable_dir(path, "--out")


def entry() -> None:
  """Console-script entry point (`grood-score`)."""
  sys.exit(main())


if __name__ == "__main__":
  entry()
