"""The one protocol every detector follows, and the registry of detectors.

A detector is fitted on the ID training split and scores any split; higher = more ID.

  det = make_detector("knn", k=10)          # unknown name or parameter -> DetectorError
  state = det.fit(ctx)                       # a pytree (dict of arrays): saved, sharded as-is
  scores_N = det.score(ctx, state, split)    # numpy float32, higher = more in-distribution
  pred_N = det.predict(ctx, state, split)    # the detector's own class prediction

`Split` carries what the backbone produced for one data set (features and logits computed
once, cached); `Context` carries the model as pure functions, the ID train split and the
auxiliary sets some detectors need (OOD validation, noise). Detectors that must re-run the
model (ODIN, GradNorm, GROOD's mix-up) use `ctx.fns` / `ctx.params` / `ctx.normalize`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, ClassVar

import numpy as np


class DetectorError(ValueError):
  """Unknown detector or parameter, or a detector that cannot run: the message says why."""


@dataclasses.dataclass
class Split:
  name: str
  feats: np.ndarray                  # (N, D) penultimate features
  logits: np.ndarray                 # (N, C)
  images: np.ndarray | None = None   # (N, H, W, C) uint8, for detectors that re-run the model
  labels: np.ndarray | None = None   # (N,) int32 true labels (ID sets)
  early: np.ndarray | None = None    # (N, F) flattened early features, filled on demand

  def __len__(self) -> int:
    return len(self.feats)


@dataclasses.dataclass
class Context:
  fns: Any                           # grood_jax.modelfns.ModelFns
  params: Any                        # the model's parameter pytree
  mean: Any                          # input normalisation (see data.base.normalize)
  std: Any
  train: Split                       # ID training split (fit on it)
  ood_val: Split | None = None       # OOD validation set: never a test set
  noise: Split | None = None         # blurred noise images (GROOD's noise source)
  seed: int = 0
  batch_size: int = 256
  cache: dict = dataclasses.field(default_factory=dict)

  def early_of(self, split: Split) -> np.ndarray:
    """Flattened early features of a split, computed once and kept on the split."""
    if split.early is None:
      from grood_jax.features import extract
      if split.images is None:
        raise DetectorError(f"{split.name}: early features need the images")
      split.early = extract(self.fns, self.params, split.images, mean=self.mean, std=self.std,
                            batch_size=self.batch_size, with_early=True).early
    return split.early


class Detector:
  """Base class: subclasses set name, defaults, grid and implement fit / score."""

  name: ClassVar[str] = ""
  defaults: ClassVar[dict] = {}
  grid: ClassVar[dict[str, list]] = {}      # search grid for --select (subset of defaults' keys)
  needs_model: ClassVar[bool] = False       # re-runs the backbone at fit or score time
  description: ClassVar[str] = ""

  def __init__(self, **params):
    unknown = sorted(set(params) - set(self.defaults))
    if unknown:
      raise DetectorError(f"detector {self.name!r} has no parameter(s) {unknown}; "
                          f"its parameters are {sorted(self.defaults)}")
    self.params = {**self.defaults, **params}

  def fit(self, ctx: Context) -> dict:
    return {}

  def score(self, ctx: Context, state: dict, split: Split) -> np.ndarray:
    raise NotImplementedError

  def predict(self, ctx: Context, state: dict, split: Split) -> np.ndarray:
    return np.asarray(split.logits).argmax(-1)

  def grid_points(self) -> list[dict]:
    """Every combination of the search grid, each a full parameter dict."""
    keys = list(self.grid)
    return [{**self.params, **dict(zip(keys, vals))}
            for vals in itertools.product(*(self.grid[k] for k in keys))]

  def __repr__(self) -> str:
    return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
  if not cls.name:
    raise TypeError(f"{cls} has no name")
  REGISTRY[cls.name] = cls
  return cls


def make_detector(name: str, **params) -> Detector:
  if name not in REGISTRY:
    raise DetectorError(f"unknown detector {name!r}; choose from {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name](**params)


def parse_detectors(spec: str) -> list[str]:
  """'grood,knn' -> ['grood', 'knn']; 'all' -> every registered detector."""
  names = [s.strip() for s in spec.split(",") if s.strip()]
  if names == ["all"]:
    return sorted(REGISTRY)
  unknown = [n for n in names if n not in REGISTRY]
  if unknown or not names:
    raise DetectorError(f"unknown detector(s) {unknown or spec!r}; choose from "
                        f"{', '.join(sorted(REGISTRY))} or 'all'")
  return names
