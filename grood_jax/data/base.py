"""Data containers shared by every source and benchmark.

Images travel as uint8 arrays (N, H, W, C) until the model needs them; `normalize` turns
them into the float32 model input. Labels are int32 (N,) or None for unlabelled OOD sets.
"""

from __future__ import annotations

import dataclasses

import numpy as np


from grood_jax.errors import DataError  # noqa: F401  (defined in the errors leaf)


@dataclasses.dataclass
class ImageSet:
  name: str
  images: np.ndarray            # (N, H, W, C) uint8
  labels: np.ndarray | None = None  # (N,) int32

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise DataError(f"{self.name}: images must be uint8 (N,H,W,C), got {self.images.dtype} "
                      f"{self.images.shape}")
    if self.labels is not None and len(self.labels) != len(self.images):
      raise DataError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

  def __len__(self) -> int:
    return len(self.images)

  def subset(self, idx, name: str | None = None) -> "ImageSet":
    return ImageSet(name or self.name, self.images[idx],
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
