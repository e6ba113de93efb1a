"""Shared pieces of the benchmarks: machine description, timing, results, subprocess peaks."""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def optional(name: str):
  """The module, or None when it is not installed (torch and faiss are optional)."""
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def cpu_name() -> str:
  """The CPU as the machine reports it (/proc/cpuinfo `model name`), else platform's guess."""
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return cpu or "unknown"


def machine() -> dict:
  import jax
  cpu = cpu_name()
  mem_gib = None
  try:
    import psutil
    mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
  except ImportError:
    pass
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("numpy", "torch", "faiss"):
    mod = optional(name)
    if mod is not None:
      versions[name] = getattr(mod, "__version__", "?")
  return {"host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "mem_gib": mem_gib,
          "jax_backend": jax.default_backend(),
          "jax_devices": [str(d) for d in jax.devices()], "versions": versions,
          "load_avg_at_start": os.getloadavg()}


# ----------------------------------------------------------------------------- run conditions

LOADED_PER_CORE = 2.0      # a 1-minute load average above 2 per core flags the run as loaded


def set_torch_threads(n: int | None = 1) -> int | None:
  """Sets torch's intra-op thread count (n = 0: as many as JAX's CPU pool, the core count);
  returns the count torch then reports, or None when torch is not installed."""
  torch = optional("torch")
  if torch is None:
    return None
  torch.set_num_threads(max(1, n if n else (os.cpu_count() or 1)))
  return torch.get_num_threads()


class Conditions:
  """What a benchmark ran under: the CPU as it reports itself, the core count, torch's thread
  count and the 1-minute load average at start and end. A run whose load (start or end)
  exceeds LOADED_PER_CORE per core is flagged: printed as LOADED and recorded as
  payload["loaded"] = True (its figures are not to be quoted as idle figures).

    cond = _util.Conditions(torch_threads=_util.set_torch_threads(1))   # at the start
    ...
    _util.finish(payload, cond)                                          # before saving
  """

  def __init__(self, torch_threads: int | None = None, note: str | None = None):
    import datetime
    self.started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    self.cpu = cpu_name()
    self.cores = os.cpu_count() or 1
    self.torch_threads = torch_threads
    self.note = note
    self.load_start = os.getloadavg()[0]
    print(self.line(), flush=True)

  def line(self, load_end: float | None = None) -> str:
    torch_t = "torch not used/installed" if self.torch_threads is None else \
        f"torch threads {self.torch_threads}"
    load = f"load (1 min) {self.load_start:.2f} at start"
    if load_end is not None:
      load += f", {load_end:.2f} at end"
    limit = LOADED_PER_CORE * self.cores
    flag = ""
    worst = max(self.load_start, load_end if load_end is not None else 0.0)
    if worst > limit:
      flag = f"  ** LOADED: above {limit:g} (= {LOADED_PER_CORE:g} per core); not idle figures **"
    return f"machine: {self.cpu}, {self.cores} cores, {torch_t}; {load}{flag}"

  def finish(self) -> dict:
    import datetime
    load_end = os.getloadavg()[0]
    limit = LOADED_PER_CORE * self.cores
    out = {"cpu": self.cpu, "cores": self.cores, "torch_threads": self.torch_threads,
           "started": self.started,
           "ended": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "load_1min_start": self.load_start, "load_1min_end": load_end,
           "loaded_threshold": limit,
           "loaded": bool(max(self.load_start, load_end) > limit)}
    if self.note:
      out["note"] = self.note
    print(self.line(load_end), flush=True)
    return out


def load_torch_twin(net, state_dict: dict, who: str):
  """Loads a numpy state dict (from `grood_jax.convert.state_dict_of`) into a torch module and
  puts it in eval mode; a key that does not fit (other than BatchNorm's num_batches_tracked)
  ends the run."""
  import numpy as np
  import torch
  missing, unexpected = net.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=False)
  bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
  if bad:
    raise SystemExit(f"{who}: keys do not fit: {bad}")
  return net.eval()


def finish(payload: dict, cond: Conditions) -> dict:
  """Adds the run conditions (payload["conditions"], payload["loaded"]) and prints them."""
  c = cond.finish()
  payload["conditions"] = c
  payload["loaded"] = c["loaded"]
  return payload


def timed(fn, reps: int = 3, warmup: int = 1) -> float:
  """Median wall seconds of fn() (results blocked on) over `reps` runs after `warmup` runs."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  ts.sort()
  return ts[len(ts) // 2]


def interleaved(fns: dict, reps: int = 3, warmup: int = 1) -> dict:
  """Median seconds of every fn, the runs interleaved (a, b, c, a, b, c, ...) so that load
  from other processes falls on all of them alike: ratios are the figures to trust."""
  import jax
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  ts = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      ts[k].append(time.perf_counter() - t)
  return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def peak_rss_bytes() -> int:
  """Peak resident memory of this process (VmHWM). Not ru_maxrss: on Linux that survives
  exec, so a subprocess would report its parent's peak when the parent is bigger."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def run_worker(script: str, args: dict, timeout: float = 900) -> dict:
  """Runs `script --worker JSON` in a fresh process (its own peak RSS); returns its JSON line."""
  res = subprocess.run([sys.executable, script, "--worker", json.dumps(args)],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
  if res.returncode != 0:
    raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def save(name: str, payload: dict, out_dir: str | None = None) -> str:
  out_dir = out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  return path


def table(rows: list[dict], cols: list[str]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return "-" if v is None else str(v)
  cells = [[fmt(r.get(c)) for c in cols] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c)
            for i, c in enumerate(cols)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
  lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def plot_path(name: str, out_dir: str | None = None) -> str:
  return os.path.join(out_dir or RESULTS_DIR, f"{name}.png")
