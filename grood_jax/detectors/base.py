"""The one protocol every detector follows, and the registry of detectors.

A detector is fitted on the ID training split and scores any split; higher = more ID.

  det = make_detector("knn", k=10)          # unknown name, parameter or value -> DetectorError
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
from typing import Any, ClassVar

import numpy as np


from grood_jax.errors import DetectorError  # noqa: F401  (defined in the errors leaf)
# the registry has its own module; detector modules import `register` from either
from grood_jax.detectors.registry import REGISTRY, make_detector, parse_detectors, register  # noqa: F401,E501


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
  train: Split | None                # ID training split (fit on it)
  ood_val: Split | None = None       # OOD validation set: never a test set
  noise: Split | None = None         # blurred noise images (GROOD's noise source)
  seed: int = 0
  batch_size: int = 256
  cache: dict = dataclasses.field(default_factory=dict)
  id_val: Split | None = None        # labelled ID validation split (never a test set), if any
  progress: Any = None               # a grood_jax.progress.ProgressFn; None shows nothing

  @classmethod
  def from_arrays(cls, model, x_train, y_train=None, *, mean=0.0, std=1.0, x_ood_val=None,
                  x_noise=None, batch_size: int = 256, seed: int = 0) -> "Context":
    """A Context for any backbone and in-memory arrays, the model given once.

    model: an `nnx.Module` with the backbone interface (early / from_early / head, see
    docs/own_model.md) or a `ModelFns`. x_*: images (N, H, W, C) or (N, H, W); uint8 images
    are scaled by 1/255, float images taken as they are, then (x - mean) / std
    (`features.normalize`). y_train: int labels (N,), needed by detectors that use class
    statistics (GROOD, Mahalanobis, ...). x_ood_val: optional OOD *validation* images (GROOD's
    `oodval` source); x_noise: optional noise images (GROOD's `noise` source).
    Features and logits are extracted once here; `ctx.split(x)` does the same for a set to score.
    """
    from grood_jax.modelfns import ModelFns
    fns = model if isinstance(model, ModelFns) else ModelFns(model)
    ctx = cls(fns=fns, params=fns.params, mean=mean, std=std, train=None, seed=int(seed),
              batch_size=int(batch_size))
    ctx.train = ctx.split(x_train, labels=y_train, name="train")
    if x_ood_val is not None:
      ctx.ood_val = ctx.split(x_ood_val, name="ood_val")
    if x_noise is not None:
      ctx.noise = ctx.split(x_noise, name="noise")
    return ctx

  def split(self, images, labels=None, *, name: str = "split") -> Split:
    """Features and logits of `images` under this context's model, as a `Split` to score."""
    from grood_jax.features import extract
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or len(images) == 0:
      raise DetectorError(f"{name}: images must be (N, H, W, C) or (N, H, W) with N >= 1, got "
                          f"shape {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
      raise DetectorError(f"{name}: images must be uint8 or float, got {images.dtype}")
    if images.dtype != np.uint8 and not np.isfinite(images).all():
      raise DetectorError(f"{name}: images hold NaN or Inf values")
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DetectorError(f"{name}: labels must be {len(images)} integers, got "
                            f"{labels.dtype} {labels.shape}")
      labels = labels.astype(np.int32)
    f = extract(self.fns, self.params, images, mean=self.mean, std=self.std,
                batch_size=self.batch_size)
    return Split(name=name, feats=f.feats, logits=f.logits, images=images, labels=labels)

  def bar(self, desc: str, total: int, unit: str = "it"):
    """A progress bar from this context's `progress` callback (a no-op bar without one):
    detectors pass its `update` to the batched loops (gradients, kNN query blocks)."""
    from grood_jax.progress import no_progress
    return (self.progress or no_progress)(desc, total, unit)

  def early_of(self, split: Split) -> np.ndarray:
    """Flattened early features of a split, computed once and kept on the split."""
    if split.early is None:
      from grood_jax.features import early_features
      if split.images is None:
        raise DetectorError(f"{split.name}: early features need the images")
      split.early = early_features(self.fns, self.params, split.images, mean=self.mean,
                                   std=self.std, batch_size=self.batch_size)
    return split.early


@dataclasses.dataclass(frozen=True)
class Param:
  """The type and range of one detector parameter, checked when a detector is made (before any
  data is loaded or any file written).

    Param("int", lo=1)                       k >= 1; 1.5 or "abc" is an error, 2.0 becomes 2
    Param("float", lo=0, hi=100)             finite, in [0, 100]; NaN / Inf are errors
    Param("float", lo=0, lo_open=True)       > 0
    Param("str", choices=("s", "b", "p"))    one of these
    Param("float", lo=0, hi=1, choices=("auto",))   a number in range, or one of the choices

  `type` is "int", "float", "number" (int or float, kept as given), "str" or "bool";
  `choices` are extra accepted values (for "str": the only ones, when given).
  """
  type: str = "float"
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple = ()
  doc: str = ""

  def describe(self) -> str:
    parts = [self.type]
    if self.lo is not None or self.hi is not None:
      lo = "-inf" if self.lo is None else f"{self.lo:g}"
      hi = "inf" if self.hi is None else f"{self.hi:g}"
      parts.append(f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}"
                   f"{')' if self.hi_open or self.hi is None else ']'}")
    if self.choices:
      parts.append(("or " if self.type != "str" else "") + "|".join(map(str, self.choices)))
    return " ".join(parts)

  def check(self, who: str, key: str, value):
    """`value` converted to this parameter's type, or DetectorError saying what to give."""
    def bad(why: str):
      return DetectorError(f"{who}.{key}={value!r}: {why}; expected {self.describe()}")

    if self.choices and isinstance(value, str) and value in self.choices:
      return value
    if self.type == "str":
      if not isinstance(value, str):
        raise bad("not a string")
      if self.choices:
        raise bad("not one of the choices")
      return value
    if self.type == "bool":
      if isinstance(value, (bool, np.bool_)):
        return bool(value)
      raise bad("not True or False")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
      raise bad("not a number")
    if not np.isfinite(float(value)):
      raise bad("not a finite number")
    if self.type == "int":
      if float(value) != int(value):
        raise bad("not an integer")
      value = int(value)
    elif self.type == "float":
      value = float(value)
    elif self.type == "number":         # an int stays an int, a float a float
      value = int(value) if isinstance(value, (int, np.integer)) else float(value)
    else:
      raise TypeError(f"Param type {self.type!r}")
    if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
      raise bad("out of range")
    if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
      raise bad("out of range")
    return value


def infer_param(default) -> Param:
  """The spec of a parameter that declares none, from its default's type."""
  if isinstance(default, bool):
    return Param("bool")
  if isinstance(default, (int, np.integer)):
    return Param("int")
  if isinstance(default, (float, np.floating)):
    return Param("float")
  return Param("str")


class Detector:
  """Base class: subclasses set name, defaults, grid and implement fit / score."""

  name: ClassVar[str] = ""
  defaults: ClassVar[dict] = {}
  grid: ClassVar[dict[str, list]] = {}      # search grid for --select (subset of defaults' keys)
  specs: ClassVar[dict[str, Param]] = {}    # type and range per parameter (else from its default)
  description: ClassVar[str] = ""

  def __init__(self, **params):
    unknown = sorted(set(params) - set(self.defaults))
    if unknown:
      raise DetectorError(f"detector {self.name!r} has no parameter(s) {unknown}; "
                          f"its parameters are {sorted(self.defaults)}")
    self.params = {k: self.spec(k).check(self.name, k, v)
                   for k, v in {**self.defaults, **params}.items()}

  @classmethod
  def spec(cls, key: str) -> Param:
    """The declared `Param` of `key`, or one inferred from its default's type."""
    return cls.specs.get(key) or infer_param(cls.defaults[key])

  # Whether fit or score reads ctx.train.logits (the (N, C) train logits): the harness drops
  # them once no detector still to run needs them. True (kept) unless a detector says not.
  uses_train_logits: ClassVar[bool] = True

  def uses_outlier_data(self) -> bool:
    """Whether this setting uses real outlier data (OpenOOD's "Outlier_Data: Yes" group, e.g.
    GROOD's `oodval` source); ranked apart from the post-hoc detectors. Default: no."""
    return False

  def check_data(self, *, num_train: int, num_classes: int, feature_dim: int) -> None:
    """DetectorError when these parameters cannot work on data of this size (e.g. k larger
    than the bank); called by the harness before any work. Override where it applies."""

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
