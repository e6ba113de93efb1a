"""Image sets read through `tfds.data_source` (array_record files; no TensorFlow needed).

The dataset must already be prepared in the tfds data directory (`tfds_data_dir`, default
`$TFDS_DATA_DIR` or ~/tensorflow_datasets) in the array_record format; nothing is downloaded
here. Records are read in chunks and every image goes through the caller's `preprocess`
(uint8 HxWxC -> uint8 array of the benchmark's shape), so only the result is kept in memory.
A set whose preprocessed size reaches `streaming.STREAM_MIN_BYTES` (or any set with
stream=True) is not kept at all: its images are a `streaming.StreamedImages` over the record
ids, read from the data source (random access) and preprocessed in grain threads on every read;
labels are read up front in one pass over the records (tfds decodes each image in that pass:
its partial decoding needs TensorFlow).

OpenOOD v1.5 sets that tfds has (the others only come from OpenOOD's image lists):

  cifar10 -> cifar10       cifar100 -> cifar100     mnist -> mnist      svhn -> svhn_cropped
  texture(s) -> dtd        places365 -> places365_small               imagenet -> imagenet2012
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from grood_jax.data import streaming
from grood_jax.data.base import DataError, ImageSet

# OpenOOD set name -> (tfds name, splits read for an OOD / test set)
TFDS_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cifar10": ("cifar10", ("test",)),
    "cifar100": ("cifar100", ("test",)),
    "mnist": ("mnist", ("test",)),
    "svhn": ("svhn_cropped", ("test",)),
    "texture": ("dtd", ("train", "validation", "test")),
    "textures": ("dtd", ("train", "validation", "test")),
    "places365": ("places365_small", ("validation",)),
    "imagenet": ("imagenet2012", ("validation",)),
}
_CHUNK = 256


def _source(dataset: str, split: str, data_dir):
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"reading tfds dataset {dataset!r} needs tensorflow-datasets "
                    "(pip install tensorflow-datasets array-record)") from None
  try:
    return tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - tfds raises assorted types for absent data
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise DataError(f"tfds dataset {dataset!r} split {split!r} is not prepared in {where} "
                    f"(array_record format) — prepare it with tfds, or use the OpenOOD layout "
                    f"(--data openood --data-root DIR) [{type(e).__name__}: {first}]") from e


def _read(src, ids: list[int]) -> list:
  """Batched read where the source supports it (array_record), else one record at a time
  (tfds' mock data sources lack a working `__getitems__`)."""
  getitems = getattr(src, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(ids))
    except TypeError:
      pass
  return [src[i] for i in ids]


def _image(rec, name: str, dataset: str) -> np.ndarray:
  if "image" not in rec:
    raise DataError(f"{name}: tfds {dataset!r} records have no 'image' feature "
                    f"(features: {sorted(rec)})")
  img = np.asarray(rec["image"])
  return img[..., None] if img.ndim == 2 else img


class _RecordImage:
  """decode((split, record id)) -> the preprocessed image (a `StreamedImages` decode fn)."""

  def __init__(self, sources, preprocess, name, dataset):
    self.sources, self.preprocess, self.name, self.dataset = sources, preprocess, name, dataset

  def __call__(self, item) -> np.ndarray:
    si, i = int(item[0]), int(item[1])
    return self.preprocess(_image(self.sources[si][i], self.name, self.dataset))


def _streamed(sources, index, shape, *, name, dataset, preprocess, labels, label_map,
              workers) -> ImageSet:
  y = None
  if labels:
    ys = []
    for start in range(0, len(index), _CHUNK):   # index is sorted by split: order kept
      chunk = index[start:start + _CHUNK]
      for si in sorted({si for si, _ in chunk}):
        recs = _read(sources[si], [i for s, i in chunk if s == si])
        ys.extend(int(r["label"]) if "label" in r else -1 for r in recs)
    y = np.asarray(ys, np.int32)
    if label_map is not None:
      y = label_map(y)
  ids = np.asarray(index, np.int64).reshape(-1, 2)     # (split, record id) rows, compact
  images = streaming.StreamedImages(ids, _RecordImage(sources, preprocess, name, dataset),
                                    shape, num_threads=workers, name=name)
  return ImageSet(name, images, y)


def load_tfds(dataset: str, splits: Sequence[str], *, name: str,
              preprocess: Callable[[np.ndarray], np.ndarray], max_n: int | None = None,
              seed: int = 0, labels: bool = True, data_dir=None,
              label_map: Callable[[np.ndarray], np.ndarray] | None = None,
              stream: bool | None = None, workers: int = 8) -> ImageSet:
  """Reads `splits` of a tfds dataset (concatenated) into an ImageSet of preprocessed images.

  `max_n`: keep a seeded random subset of at most that many records (chosen before decoding).
  `stream`: None streams sets of >= streaming.STREAM_MIN_BYTES (module docstring), True every
  set, False none; `workers` decode threads of a streamed set.
  """
  sources = [_source(dataset, s, data_dir) for s in splits]
  index = [(si, i) for si, src in enumerate(sources) for i in range(len(src))]
  if not index:
    raise DataError(f"{name}: tfds {dataset!r} splits {list(splits)} are empty")
  if max_n is not None and len(index) > max_n:
    rng = np.random.default_rng([seed, 0x7fd5, len(index)])
    keep = np.sort(rng.choice(len(index), size=int(max_n), replace=False))
    index = [index[k] for k in keep]
  first = preprocess(_image(sources[index[0][0]][index[0][1]], name, dataset))
  if streaming.should_stream(stream, len(index), first.shape):
    return _streamed(sources, index, first.shape, name=name, dataset=dataset,
                     preprocess=preprocess, labels=labels, label_map=label_map, workers=workers)
  images, ys = None, []
  for start in range(0, len(index), _CHUNK):
    chunk = index[start:start + _CHUNK]
    for si in sorted({si for si, _ in chunk}):
      ids = [i for s, i in chunk if s == si]
      src = sources[si]
      records = _read(src, ids)
      for rec in records:
        out = preprocess(_image(rec, name, dataset))
        if images is None:
          images = np.empty((len(index),) + out.shape, np.uint8)
        images[len(ys)] = out
        ys.append(int(rec["label"]) if labels and "label" in rec else -1)
  y = np.asarray(ys, np.int32)
  if label_map is not None:
    y = label_map(y)
  return ImageSet(name, images, y if labels else None)
