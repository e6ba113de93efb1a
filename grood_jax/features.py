"""Feature extraction: the backbone runs once per dataset, in fixed-size batches.

The input convention lives here (`normalize`): uint8 images are scaled by 1/255, float
images are taken as they are, then (x - mean) / std.

The last batch is padded to the batch size, so the jitted forward compiles once per shape.
Inside `parallel.data_parallel(mesh)` each batch is split over the mesh's devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from grood_jax import parallel


def normalize(images, mean, std):
  """Images -> float32 model input (x - mean) / std, where x = images / 255 for uint8 images
  and x = images for float images (already in the model's scale, e.g. [0, 1]). Works on numpy
  or jax arrays; mean / std are scalars or per-channel."""
  x = images.astype(np.float32)
  if images.dtype == np.uint8:
    x = x / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclasses.dataclass
class Features:
  feats: np.ndarray               # (N, D) penultimate features h
  logits: np.ndarray              # (N, C)
  early: np.ndarray | None = None  # (N, F) flattened early feature maps e


def batches(n: int, batch_size: int):
  """Yields (start, stop) of fixed-size batches covering range(n)."""
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def pad_batch(x: np.ndarray, batch_size: int) -> np.ndarray:
  """Pads the leading axis up to batch_size by repeating the last row."""
  n = len(x)
  if n == batch_size:
    return x
  pad = np.repeat(x[-1:], batch_size - n, axis=0)
  return np.concatenate([x, pad], axis=0)


def process_rows(a, start: int, stop: int, first: int, rows: int) -> np.ndarray:
  """Rows [first, first + rows) of the padded batch a[start:stop] (padding = the batch's last
  row repeated, as `pad_batch`), read without reading the other processes' rows."""
  lo = start + first
  hi = min(lo + rows, stop)
  part = np.asarray(a[lo:hi]) if lo < stop else np.asarray(a[stop - 1:stop])[:0]
  if len(part) == rows:
    return part
  last = np.asarray(a[stop - 1:stop])
  return np.concatenate([part, np.repeat(last, rows - len(part), axis=0)], axis=0)


class Rows:
  """A lazy row subset `array[index]` that `map_arrays` reads batch by batch, so a selection
  of rows (e.g. GROOD's correctly classified train samples) is never copied whole."""

  def __init__(self, array, index):
    self.array, self.index = array, np.asarray(index, np.int64)
    self.shape = (len(self.index),) + tuple(np.shape(array)[1:])
    self.dtype = getattr(array, "dtype", np.float32)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, rows):
    return np.asarray(self.array[self.index[rows]])

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(self.array[self.index])
    return out if dtype is None else out.astype(dtype)


def map_arrays(fn: Callable, *arrays, batch_size: int = 512, prepare: Callable | None = None,
               progress: Callable[[int], None] | None = None,
               sink: Callable[[int, int, object], None] | None = None):
  """fn(*batches) -> pytree of (B, ...) arrays, over N rows of `arrays` in padded batches.

  The one padded-batch loop: every batch has the same shape (the last padded by repeating its
  last row), so a jitted `fn` compiles once; inside `parallel.data_parallel(mesh)` the batch
  size is rounded to the device count and each batch is split over the mesh; on several
  processes each one reads only the rows its own devices hold (`parallel.local_rows`; padding
  as on one process) and the outputs are gathered to every host (`parallel.to_host`). `arrays` are numpy
  arrays or anything with len() and slicing that returns numpy (a memmap, `Rows`, a generated
  source): only one batch of them is read at a time. `prepare` maps each host batch before it
  is placed (e.g. image normalisation). Returns the pytree of numpy arrays concatenated over
  the N rows (padding dropped); with `sink`, calls sink(start, stop, outputs) per batch
  instead and returns None (nothing accumulated: streaming into a file).
  """
  n = len(arrays[0])
  if n == 0:
    raise ValueError("map_arrays: no rows")
  outs = []
  bs = parallel.round_batch(min(batch_size, n))
  local = parallel.local_rows(bs)          # several processes: each reads only its own rows
  for start, stop in batches(n, bs):
    if local is None:
      xs = [pad_batch(np.asarray(a[start:stop]), bs) for a in arrays]
    else:
      xs = [process_rows(a, start, stop, *local) for a in arrays]
    if prepare is not None:
      xs = [prepare(x) for x in xs]
    if local is None:
      placed = [parallel.put_batch(x) for x in xs]
    else:
      placed = [parallel.put_local_batch(x, bs) for x in xs]
    out = parallel.to_host(fn(*placed))                                # gathered over hosts
    out = jax.tree.map(lambda a, k=stop - start: a[:k], out)
    if sink is not None:
      sink(start, stop, out)
    else:
      outs.append(out)
    if progress is not None:
      progress(stop - start)
  if sink is not None:
    return None
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def map_batched(fn: Callable, images_u8: np.ndarray, *, mean, std, batch_size: int = 512,
                progress: Callable[[int], None] | None = None, sink=None):
  """Applies fn(normalised_batch) -> pytree of (B, ...) arrays over images in padded batches
  (`map_arrays` with `normalize`). Returns numpy arrays concatenated over the N images (with
  `sink`: streamed to it, see `map_arrays`)."""
  if len(images_u8) == 0:
    raise ValueError("map_batched: no images")
  return map_arrays(fn, images_u8, batch_size=batch_size, progress=progress,
                    prepare=lambda x: normalize(x, mean, std), sink=sink)


def extract(fns, params, images_u8: np.ndarray, *, mean, std, batch_size: int = 512,
            with_early: bool = False, progress=None) -> Features:
  """Penultimate features, logits and (optionally) flattened early features of every image."""

  def fwd(x):
    e, h, f = fns.jit_forward(params, x)
    out = {"feats": h, "logits": f}
    if with_early:
      out["early"] = e.reshape(e.shape[0], -1)
    return out

  out = map_batched(fwd, images_u8, mean=mean, std=std, batch_size=batch_size, progress=progress)
  return Features(feats=out["feats"].astype(np.float32), logits=out["logits"].astype(np.float32),
                  early=out.get("early"))


def early_features(fns, params, images_u8: np.ndarray, *, mean, std, batch_size: int = 256,
                   progress=None) -> np.ndarray:
  """Flattened early feature maps e(x) of every image: numpy (N, F), one jitted function
  (`fns.jit_early_flat`) in fixed-size padded batches."""
  return map_batched(lambda x: fns.jit_early_flat(params, x), images_u8, mean=mean, std=std,
                     batch_size=batch_size, progress=progress)


def extract_to_files(fns, params, images_u8, paths: dict, *, mean, std, batch_size: int = 512,
                     progress=None) -> Features:
  """`extract`, streamed batch by batch into .npy files: paths = {"feats": ..., "logits": ...}.

  Each output is written through a float32 `np.lib.format.open_memmap` beside its final path
  and renamed into place once complete (no partial file under the final name); the result
  holds read-only memory maps of the files, so N x D features never need N x D of RAM.
  `images_u8` may be any sliceable source (a memmap, a generated source): one batch at a time.
  """
  import os
  n = len(images_u8)
  if n == 0:
    raise ValueError("extract_to_files: no images")
  tmp = {k: f"{p}.tmp-{os.getpid()}.npy" for k, p in paths.items()}
  maps: dict = {}

  def fwd(x):
    _, h, f = fns.jit_forward(params, x)
    return {"feats": h, "logits": f}

  def sink(start, stop, out):
    for k in paths:
      a = out[k].reshape(stop - start, -1)
      if k not in maps:
        maps[k] = np.lib.format.open_memmap(tmp[k], mode="w+", dtype=np.float32,
                                            shape=(n, a.shape[1]))
      maps[k][start:stop] = a

  try:
    map_batched(fwd, images_u8, mean=mean, std=std, batch_size=batch_size, progress=progress,
                sink=sink)
    for k, m in maps.items():
      m.flush()
      del m
    maps.clear()
    for k in paths:
      os.replace(tmp[k], paths[k])
  finally:
    maps.clear()
    for t in tmp.values():
      if os.path.exists(t):
        os.remove(t)
  return load_feature_files(paths)


def load_feature_files(paths: dict) -> Features:
  """Features of `extract_to_files` as read-only memory maps (np.load(mmap_mode="r"))."""
  got = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
  return Features(feats=got["feats"], logits=got["logits"])


MEMMAP_MIN_ROWS = 1_000_000     # sets at least this large are cached as memory-mapped .npy


def cached_feature_files(fns, params, images_u8, cache_dir: str, key: str, *, mean, std,
                         batch_size: int = 512, progress=None) -> tuple[Features, bool]:
  """(features, hit): the memory-mapped feature cache of one large image set.

  `<cache_dir>/feats-<key>.feats.npy` and `.logits.npy`, read as memory maps when both are
  readable with N float32 rows, else extracted into them (`extract_to_files`). The feature
  cache of the scoring harness uses it for sets of `MEMMAP_MIN_ROWS` images or more."""
  import os
  paths = {k: os.path.join(cache_dir, f"feats-{key}.{k}.npy") for k in ("feats", "logits")}
  n = len(images_u8)
  if all(os.path.exists(p) for p in paths.values()):
    try:
      got = load_feature_files(paths)
      if all(a.ndim == 2 and len(a) == n and a.dtype == np.float32
             for a in (got.feats, got.logits)):
        return got, True
    except (OSError, ValueError):
      pass
  os.makedirs(cache_dir, exist_ok=True)
  return extract_to_files(fns, params, images_u8, paths, mean=mean, std=std,
                          batch_size=batch_size, progress=progress), False
