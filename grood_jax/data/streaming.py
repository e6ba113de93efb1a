"""Image sets decoded on demand through a grain pipeline, never held whole (`StreamedImages`).

A `StreamedImages` is N items (file paths, record ids, ...) and a `decode(item) -> uint8
(H, W, C)` function. It looks like a read-only uint8 (N, H, W, C) array to the rest of the
library: `len`, `shape`, `dtype`, `ndim`, and `images[...]` with an int, a slice, an index
array or a boolean mask returns numpy. Reads go through grain:

  grain.MapDataset.source(item indices)[start:] .map(decode)
      .to_iter_dataset(grain.ReadOptions(num_threads=T, prefetch_buffer_size=P))

A contiguous slice that starts where the previous one stopped (the batch-by-batch read of
`features.map_arrays`) continues the same iterator, whose T threads have already decoded the
next P items while the caller worked on the last batch; a slice that starts elsewhere restarts
that iterator there. An index array, a boolean mask or a strided slice (GROOD's mix-up rows, a
training batch) runs a short pipeline of its own over just those rows and leaves the
sequential iterator as it was.

Memory bound: between two reads at most P decoded images wait in the prefetch buffer (P + 1
while one is handed over), so the images held by a source are at most (P + 1) x H·W·C bytes
plus the batch being returned (B x H·W·C), whatever N is. The default P = 64 is 0.2 MiB of
CIFAR images and 9.4 MiB of 224x224 RGB ones. `stats()` reports the largest number of
decoded-or-decoding items not yet taken from the iterator (`max_ahead`, <= P + 1).

`subset(idx)` composes index arrays (lazy, nothing decoded). `np.asarray(images)` /
`materialize()` decode everything (the eager path of small sets, `STREAM_MIN_BYTES`), as does
an index that does not start with the rows (`images[..., 0]`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from grood_jax.errors import DataError

DEFAULT_THREADS = 8
DEFAULT_PREFETCH = 64
STREAM_MIN_BYTES = 1 << 30   # sets whose decoded uint8 size is at least this are streamed


def should_stream(stream: bool | None, n: int, image_shape) -> bool:
  """`stream` when given, else True for sets of at least `STREAM_MIN_BYTES` decoded bytes."""
  if stream is not None:
    return bool(stream)
  return int(n) * int(np.prod(image_shape)) >= STREAM_MIN_BYTES


class _Counter:
  """Decoded-vs-taken counts of one source (thread-safe), for the memory bound's check."""

  def __init__(self):
    self.lock = threading.Lock()
    self.started = 0       # decode calls started by the sequential pipeline
    self.taken = 0         # items taken from the sequential iterator
    self.max_ahead = 0
    self.threads: set[str] = set()

  def start(self):
    with self.lock:
      self.started += 1
      self.max_ahead = max(self.max_ahead, self.started - self.taken)
      self.threads.add(threading.current_thread().name)

  def take(self):
    with self.lock:
      self.taken += 1

  def reset(self):
    with self.lock:
      self.started = self.taken = 0


class StreamedImages:
  """N uint8 images of shape `image_shape`, decoded from `items` by `decode` on every read
  (see the module docstring for the pipeline and the memory bound).

  items: a sequence (list of paths, list of record ids); `index` (int64) picks and orders the
  rows of this view (`subset`). decode(item) must return uint8 (H, W, C) == image_shape, or
  raise DataError naming the item (any other exception is turned into one)."""

  def __init__(self, items: Sequence, decode: Callable[[Any], np.ndarray], image_shape, *,
               index=None, num_threads: int = DEFAULT_THREADS,
               prefetch: int = DEFAULT_PREFETCH, name: str = "images"):
    self.items, self.decode_fn, self.name = items, decode, name
    self.image_shape = tuple(int(v) for v in image_shape)
    if len(self.image_shape) != 3 or min(self.image_shape) <= 0:
      raise DataError(f"{name}: image_shape must be (H, W, C), got {image_shape}")
    self.index = (np.arange(len(items), dtype=np.int64) if index is None
                  else np.asarray(index, np.int64))
    if self.index.ndim != 1:
      raise DataError(f"{name}: index must be 1-D, got shape {self.index.shape}")
    self.num_threads, self.prefetch = max(1, int(num_threads)), max(1, int(prefetch))
    self.shape = (len(self.index),) + self.image_shape
    self.dtype = np.dtype(np.uint8)
    self.ndim = 4
    self._lock = threading.Lock()
    self._it = None          # the sequential grain iterator ...
    self._pos = None         # ... and the row its next item belongs to
    self._count = _Counter()

  # -- array protocol --------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self.index)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size

  def __repr__(self) -> str:
    return (f"StreamedImages({self.name!r}, shape={self.shape}, threads={self.num_threads}, "
            f"prefetch={self.prefetch})")

  def __getitem__(self, key):
    n = len(self)
    if isinstance(key, (int, np.integer)):
      i = int(key) + n if key < 0 else int(key)
      if not 0 <= i < n:
        raise IndexError(f"{self.name}: index {key} out of range for {n} images")
      return self._decode(int(self.index[i]))
    if isinstance(key, slice):
      start, stop, step = key.indices(n)
      if step == 1:
        return self._read_range(start, max(start, stop))
      return self._gather(np.arange(start, stop, step))
    if isinstance(key, tuple):
      if not key or key[0] is Ellipsis or key[0] is None:
        return self.materialize()[key]     # e.g. images[..., 0]: needs every row
      rows = self[key[0]]
      return rows[(slice(None),) + key[1:]] if rows.ndim == 4 else rows[key[1:]]
    rows = np.asarray(key)
    if rows.dtype == bool:
      if rows.shape != (n,):
        raise IndexError(f"{self.name}: boolean mask of shape {rows.shape} for {n} images")
      rows = np.flatnonzero(rows)
    if not np.issubdtype(rows.dtype, np.integer):
      raise TypeError(f"{self.name}: index arrays must be integers or booleans, "
                      f"got {rows.dtype}")
    if rows.ndim != 1:
      out = self._gather(rows.reshape(-1))
      return out.reshape(rows.shape + self.image_shape)
    return self._gather(rows)

  def __array__(self, dtype=None, copy=None):
    out = self.materialize()
    return out if dtype is None else out.astype(dtype)

  def materialize(self) -> np.ndarray:
    """Every image decoded into one uint8 (N, H, W, C) array (through the pipeline)."""
    return self[:]

  def subset(self, idx) -> "StreamedImages":
    """The rows `idx` (an index array, boolean mask or slice) as a new lazy source."""
    if isinstance(idx, slice):
      new = self.index[idx]
    else:
      idx = np.asarray(idx)
      if idx.dtype == bool:
        if idx.shape != (len(self),):
          raise IndexError(f"{self.name}: boolean mask of shape {idx.shape} for {len(self)} "
                           "images")
        idx = np.flatnonzero(idx)
      new = self.index[np.asarray(idx, np.int64)]
    return StreamedImages(self.items, self.decode_fn, self.image_shape, index=new,
                          num_threads=self.num_threads, prefetch=self.prefetch, name=self.name)

  def stats(self) -> dict:
    """Of the sequential pipeline: decode calls started, items taken, the largest number
    decoded (or being decoded) but not yet taken (`max_ahead` <= prefetch + 1), threads."""
    c = self._count
    with c.lock:
      return {"started": c.started, "taken": c.taken, "max_ahead": c.max_ahead,
              "threads": sorted(c.threads)}

  def close(self) -> None:
    """Stops the read-ahead threads (a later sequential read starts a fresh pipeline)."""
    with self._lock:
      self._close_locked()

  def __del__(self):
    try:
      self._close_locked()
    except Exception:   # noqa: BLE001 - interpreter shutdown
      pass

  # -- reading ---------------------------------------------------------------------------

  def _decode(self, item_index: int) -> np.ndarray:
    item = self.items[item_index]
    try:
      out = self.decode_fn(item)
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 - any decoder failure names the item
      raise DataError(f"{self.name}: cannot decode {item!r} ({type(e).__name__}: {e})") from e
    out = np.asarray(out)
    if out.shape != self.image_shape or out.dtype != np.uint8:
      raise DataError(f"{self.name}: {item!r} decoded to {out.dtype} {out.shape}, expected "
                      f"uint8 {self.image_shape}")
    return out

  def _pipeline(self, rows: np.ndarray, *, counted: bool):
    import grain   # pylint: disable=import-outside-toplevel
    items = self.index[rows]
    count = self._count

    def decode(i):
      if counted:
        count.start()
      return self._decode(int(i))

    ds = grain.MapDataset.source(items).map(decode)
    threads = min(self.num_threads, max(1, len(items)))
    opts = grain.ReadOptions(num_threads=threads,
                             prefetch_buffer_size=min(self.prefetch, max(1, len(items))))
    return iter(ds.to_iter_dataset(opts))

  def _gather(self, rows: np.ndarray) -> np.ndarray:
    n = len(self)
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < -n or rows.max() >= n):
      raise IndexError(f"{self.name}: index out of range for {n} images")
    rows = np.where(rows < 0, rows + n, rows)
    out = np.empty((len(rows),) + self.image_shape, np.uint8)
    if len(rows) == 1:
      out[0] = self._decode(int(self.index[rows[0]]))
      return out
    if len(rows):
      it = self._pipeline(rows, counted=False)
      try:
        for k in range(len(rows)):
          out[k] = next(it)
      finally:
        it.close()
    return out

  def _close_locked(self) -> None:
    it, self._it, self._pos = self._it, None, None
    if it is not None:
      it.close()

  def _read_range(self, start: int, stop: int) -> np.ndarray:
    out = np.empty((stop - start,) + self.image_shape, np.uint8)
    if stop == start:
      return out
    with self._lock:
      if self._it is None or self._pos != start:
        self._close_locked()
        self._count.reset()
        self._it = self._pipeline(np.arange(start, len(self)), counted=True)
        self._pos = start
      try:
        for k in range(stop - start):
          out[k] = next(self._it)
          self._count.take()
          self._pos += 1
      except BaseException:
        self._close_locked()      # a failed read (a missing file) leaves no half-used cursor
        raise
      if self._pos >= len(self):
        self._close_locked()
    return out
