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
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the OOD-val halves, subsets and detectors' sampling (>= 0)")
  p.add_argument("--data-dir", help="where local data sets live")
  p.add_argument("--data", choices=["openood", "tfds"], default="openood",
                 help="where cifar10/cifar100/imagenet200/imagenet1k are read from (default: %(default)s)")
  p.add_argument("--data-root", help="OpenOOD v1.5 data folder (benchmark_imglist/, images_classic/, "
                 "images_largescale/); default: searched in --data-dir")
  p.add_argument("--max-per-set", type=int, help="seeded random subset of at most N images per set "
                 "(ImageNet-scale sets)")
  p.add_argument("--allow-missing", action="store_true",
                 help="score without the optional sets (OOD sets, OOD val) of an OpenOOD benchmark "
                 "that are absent, with one warning naming them (default: an error)")
  p.add_argument("--batch-size", type=int, default=512)
  p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
  p.add_argument("--no-plots", action="store_true", help="tables only (faster)")
  p.add_argument("--quiet", action="store_true",
                 help="no progress bars and no progress lines (warnings and errors still show)")
  p.add_argument("--list-detectors", action="store_true", help="list detectors and exit")
  p.add_argument("--devices", type=int, default=0,
                 help="spread batches and kNN banks over this many devices (default 0: all)")
  p.add_argument("--distributed", action="store_true",
                 help="run as one of several processes (multi-host TPU/GPU, or local CPU "
                 "processes): jax.distributed.initialize() first, the cluster auto-detected "
                 "(TPU pod, SLURM, Open MPI, Kubernetes) unless the three flags below are given; "
                 "run the same command on every process, process 0 writes the report")
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="with --distributed: process 0's address and a free port (same on every "
                 "process)")
  p.add_argument("--num-processes", type=int, metavar="N",
                 help="with --distributed: the number of processes")
  p.add_argument("--process-id", type=int, metavar="I",
                 help="with --distributed: this process's id, 0..N-1")
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
  args.argv = None if argv is None else [str(a) for a in argv]
  return run_cli(lambda: run(args), debug=args.debug,
                 interrupted="interrupted; the previous report (if any) is intact")


def run(args) -> int:
  from grood_jax import parallel
  if args.distributed or any(v is not None for v in
                             (args.coordinator, args.num_processes, args.process_id)):
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from grood_jax.errors import ConfigError
  try:
    mesh = parallel.mesh_for(args.devices)
  except ValueError as e:
    raise ConfigError(f"--devices {args.devices}: {e}") from None
  with parallel.data_parallel(mesh):       # batches split, banks sharded over the devices
    return _score(args)


def _check_numbers(args) -> None:
  from grood_jax.errors import ConfigError, DataError, DetectorError
  if args.batch_size < 1:
    raise DetectorError(f"--batch-size {args.batch_size}: must be at least 1")
  if args.seed < 0:
    raise ConfigError(f"--seed {args.seed}: must be >= 0")
  if args.max_per_set is not None and args.max_per_set < 1:
    raise DataError(f"--max-per-set {args.max_per_set}: must be at least 1 (or leave it out)")
  if args.devices < 0:
    raise ConfigError(f"--devices {args.devices}: must be >= 0 (0: all devices)")


def _check_detectors(names: list[str], overrides: dict, select: bool) -> None:
  """Every requested detector (and, with --select, every grid point) made with its --param
  values: unknown names, types and ranges are DetectorErrors now. Data-size checks (e.g.
  knn.k <= the bank) follow once the benchmark is loaded, still before any work."""
  from grood_jax.errors import DetectorError
  from grood_jax.detectors import make_detector
  for det in overrides:
    if det not in names:
      raise DetectorError(f"--param {det}.*: detector {det!r} is not among --detectors {names}")
  for name in names:
    d = make_detector(name, **overrides.get(name, {}))
    if select:
      for point in d.grid_points():
        make_detector(name, **point)


# room under --out for the longest name written there (cache/feats-<key>.npz and temporaries)
_ROOM_IN_OUT = 64
_SIBLING_EXTRA = len(".") + len(".report-") + 8     # the temporary report beside --out


def check_out_path(out: str) -> None:
  """OutputError unless --out can hold the report: name lengths within the file system's
  NAME_MAX / PATH_MAX (with room for what is written inside and beside it), writable (or
  creatable), its parent writable (the report is swapped in beside it), and no files in it
  that a report did not write. Creates nothing."""
  from grood_jax import report
  from grood_jax.errors import OutputError
  from grood_jax.fileio import check_writable_dir
  full = os.path.abspath(out)
  probe = full
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  def conf(name, default):
    try:
      v = os.pathconf(probe, name)
    except (OSError, ValueError):
      v = None
    return v if v and v > 0 else default
  name_max, path_max = conf("PC_NAME_MAX", 255), conf("PC_PATH_MAX", 4096)
  for comp in full.split(os.sep):
    if len(os.fsencode(comp)) > name_max:
      raise OutputError(f"--out: the name {comp[:40]!r}... is {len(os.fsencode(comp))} bytes, "
                        f"longer than the file system's limit of {name_max}; choose a shorter "
                        "--out")
  base = os.path.basename(full)
  if len(os.fsencode(base)) + _SIBLING_EXTRA > name_max:
    raise OutputError(f"--out: the last name {base[:40]!r}... is {len(os.fsencode(base))} bytes; "
                      f"at most {name_max - _SIBLING_EXTRA} leave room for the temporary report "
                      "written beside it; choose a shorter --out")
  if len(os.fsencode(full)) + _ROOM_IN_OUT > path_max:
    raise OutputError(f"--out: the path is {len(os.fsencode(full))} bytes; at most "
                      f"{path_max - _ROOM_IN_OUT} leave room for the files inside it (limit "
                      f"{path_max}); choose a shorter --out")
  check_writable_dir(out, "--out")
  parent = os.path.dirname(full)
  if os.path.isdir(full) and not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"--out {out}: its parent {parent} is not writable (the report is written "
                      "beside --out, then swapped in); choose another --out")
  foreign = report.foreign_entries(full)
  if foreign:
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    raise OutputError(f"--out {out} holds {len(foreign)} file(s) that no report wrote ({shown}); "
                      "the report directory is replaced whole, so choose an empty or new --out")


class Progress:
  """Progress for the harness: tqdm bars on a terminal (stderr), plain lines otherwise, nothing
  with --quiet; only on process 0 of a multi-host run."""

  MININTERVAL = 0.25             # seconds between bar refreshes

  def __init__(self, quiet: bool):
    import jax
    self.main = jax.process_index() == 0
    self.lines = self.main and not quiet
    self.bars = self.lines and sys.stderr.isatty()

  def __call__(self, desc: str, total: int, unit: str = "it"):
    from grood_jax.progress import no_progress
    if not self.bars:
      return no_progress(desc, total, unit)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=self.MININTERVAL)

  def log(self, text: str) -> None:
    if not self.lines:
      return
    if self.bars:
      from tqdm import tqdm
      tqdm.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)


def _score(args) -> int:
  from grood_jax.checkpoint import CheckpointError
  from grood_jax.detectors import parse_detectors
  from grood_jax.data import parse_ood_spec
  from grood_jax.data.openood import Options as DataOptions
  from grood_jax import report, stats
  from grood_jax.fileio import lock_dir
  from grood_jax.scoring import ScoreOptions, prepare_checkpoint, provenance, score_prepared

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
  _check_numbers(args)
  names = parse_detectors(args.detectors)
  overrides = parse_param_overrides(args.param)
  _check_detectors(names, overrides, args.select)
  extra = [parse_ood_spec(s) for s in args.ood]
  data_options = DataOptions(source=args.data, data_root=args.data_root,
                             max_per_set=args.max_per_set, allow_missing=args.allow_missing)
  out = args.out or os.path.join(args.ckpt[0], "report")
  from grood_jax import parallel
  main_process = parallel.is_main_process()   # several processes: process 0 writes --out
  if main_process:
    check_out_path(out)            # creates nothing
    if os.path.exists(os.path.join(out, report.LOCK_FILE)):
      with lock_dir(out, "--out"):  # another run writing this --out: say so now, not after work
        pass
  opts = ScoreOptions(detectors=names, benchmark=args.benchmark, extra_ood=extra,
                      select=args.select, detector_params=overrides, data_dir=args.data_dir,
                      seed=args.seed, batch_size=args.batch_size,
                      cache_dir=None if args.no_cache else os.path.join(out, report.CACHE_DIR),
                      data_options=data_options)
  t0 = time.time()
  benchmarks: dict = {}
  # restores each model, loads the data, checks every detector against the data sizes
  prepared = [prepare_checkpoint(c, opts, benchmarks=benchmarks) for c in args.ckpt]

  # 2. Work, holding the --out lock: the feature cache (--out/cache) is the first thing written.
  progress = Progress(args.quiet)
  log = lambda s: progress.log(f"  {s}")  # noqa: E731
  import contextlib
  with lock_dir(out, "--out") if main_process else contextlib.nullcontext():
    if main_process:
      report.clean_stale(out)
    runs, timings = [], []
    for i, prep in enumerate(prepared):
      progress.log(f"[{i + 1}/{len(prepared)}] scoring {prep.ckpt_dir} ...")
      timing: dict = {}
      runs.append(score_prepared(prep, opts, log=log, timing=timing, progress=progress))
      timings.append({"checkpoint": os.path.abspath(prep.ckpt_dir), **timing})
    if len(runs) == 1:
      results = runs[0][0]
    else:
      results = stats.aggregate_runs([r for r, _ in runs])
    if progress.main:
      print(report.format_table(results))
    # Wall-clock times and provenance live beside results.json, so that it is reproducible.
    if not main_process:                 # process 0 alone writes the report
      return 0
    timing_doc = {"total_s": time.time() - t0, "runs": timings}
    paths = report.write_report(
        results, out, scores=runs[0][1], plots=not args.no_plots,
        score_runs=[s for _, s in runs], checkpoints=[p.ckpt_dir for p in prepared],
        id_labels=prepared[0].bench.id_test.labels,
        provenance=provenance(prepared, _command_line(args.argv)),
        timing=timing_doc)
  progress.log(f"report: {os.path.join(out, 'report.html')} ({len(paths)} files) in "
               f"{time.time() - t0:.1f}s")
  return 0


def _command_line(argv: list[str] | None) -> list[str]:
  """The command as typed (sys.argv), or `grood-score ARGS` when main() was given its args."""
  if argv is None:
    return [os.path.basename(sys.argv[0] or "grood-score"), *sys.argv[1:]]
  return ["grood-score", *argv]


def entry() -> None:
  """Console-script entry point (`grood-score`)."""
  sys.exit(main())


if __name__ == "__main__":
  entry()
