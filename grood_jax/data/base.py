"""Data containers shared by every source and benchmark.

Images travel as uint8 arrays (N, H, W, C) until the model needs them; `normalize` turns
them into the float32 model input. Labels are int32 (N,) or None for unlabelled OOD sets.
`ImageSet.images` is a numpy array or a lazy source that reads like one (`len`, `.shape`,
`.dtype`, `images[...]` -> numpy, e.g. `streaming.StreamedImages`, decoded batch by batch).
"""

from __future__ import annotations

import dataclasses

import numpy as np


from grood_jax.errors import DataError  # noqa: F401  (defined in the errors leaf)


@dataclasses.dataclass
class ImageSet:
  name: str
  images: np.ndarray            # (N, H, W, C) uint8, or a lazy source of them (module doc)
  labels: np.ndarray | None = None  # (N,) int32

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) and not all(
        hasattr(self.images, a) for a in ("shape", "dtype", "__len__", "__getitem__")):
      raise DataError(f"{self.name}: images must be a uint8 (N,H,W,C) array or a lazy source "
                      f"with len(), .shape, .dtype and slicing, got {type(self.images).__name__}")
    shape = tuple(self.images.shape)             # a lazy source: checked without reading data
    if len(shape) != 4 or np.dtype(self.images.dtype) != np.uint8:
      raise DataError(f"{self.name}: images must be uint8 (N,H,W,C), got {self.images.dtype} "
                      f"{self.images.shape}")
    if self.labels is not None and len(self.labels) != len(self.images):
      raise DataError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def streamed(self) -> bool:
    """True when the images are a lazy source (decoded on each read), not an array."""
    return not isinstance(self.images, np.ndarray)

  def subset(self, idx, name: str | None = None) -> "ImageSet":
    """The rows `idx`; a lazy source stays lazy (its `subset`), an array is indexed."""
    lazy = getattr(self.images, "subset", None)
    images = lazy(idx) if callable(lazy) and self.streamed else self.images[idx]
    return ImageSet(name or self.name, images,
                    None if self.labels is None else self.labels[idx])


@dataclasses.dataclass
class OODSet:
  name: str
  group: str                     # "near" | "far"
  data: ImageSet


@dataclasses.dataclass
class Benchmark:
  name: str
  num_classes: int
  class_names: list[str]
  image_shape: tuple[int, int, int]   # (H, W, C) the model expects
  mean: float | tuple[float, ...]     # normalisation of x/255
  std: float | tuple[float, ...]
  id_train: ImageSet
  id_val: ImageSet
  id_test: ImageSet
  ood: list[OODSet]
  ood_val: ImageSet | None = None     # OOD validation set (selection, GROOD's auxiliary source)
  noise: ImageSet | None = None       # blurred noise (GROOD's noise source); never a test set


from grood_jax.features import normalize  # noqa: E402,F401  (the input convention's one home)
