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


def map_arrays(fn: Callable, *arrays, batch_size: int = 512, prepare: Callable | None = None,
               progress: Callable[[int], None] | None = None):
  """fn(*batches) -> pytree of (B, ...) arrays, over N rows of `arrays` in padded batches.

  The one padded-batch loop: every batch has the same shape (the last padded by repeating its
  last row), so a jitted `fn` compiles once; inside `parallel.data_parallel(mesh)` the batch
  size is rounded to the device count and each batch is split over the mesh. `prepare` maps
  each host batch before it is placed (e.g. image normalisation). Returns the pytree of numpy
  arrays concatenated over the N rows (padding dropped).
  """
  n = len(arrays[0])
  if n == 0:
    raise ValueError("map_arrays: no rows")
  outs = []
  bs = parallel.round_batch(min(batch_size, n))
  for start, stop in batches(n, bs):
    xs = [pad_batch(np.asarray(a[start:stop]), bs) for a in arrays]
    if prepare is not None:
      xs = [prepare(x) for x in xs]
    out = fn(*(parallel.put_batch(x) for x in xs))
    outs.append(jax.tree.map(lambda a, k=stop - start: np.asarray(a)[:k], out))
    if progress is not None:
      progress(stop - start)
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def map_batched(fn: Callable, images_u8: np.ndarray, *, mean, std, batch_size: int = 512,
                progress: Callable[[int], None] | None = None):
  """Applies fn(normalised_batch) -> pytree of (B, ...) arrays over images in padded batches
  (`map_arrays` with `normalize`). Returns numpy arrays concatenated over the N images."""
  if len(images_u8) == 0:
    raise ValueError("map_batched: no images")
  return map_arrays(fn, images_u8, batch_size=batch_size, progress=progress,
                    prepare=lambda x: normalize(x, mean, std))


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
