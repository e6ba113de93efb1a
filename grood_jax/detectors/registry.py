"""Detectors by name: a lazy registry (a detector's module is imported when it is first asked
for, so `import grood_jax` or one detector loads no other detector).

  make_detector("knn", k=10)     a configured detector (unknown name / parameter -> DetectorError)
  detector_class("grood")        its class (defaults, grid, specs, description)
  detector_names()               every built-in and registered name
  parse_detectors("grood,knn")   ['grood', 'knn']; "all" -> detector_names()

Your own detector: subclass `Detector`, decorate it with `@register` (it is then found by
name once its module is imported), or add it with `register_module(name, "pkg.module")`.
"""

from __future__ import annotations

import importlib

from grood_jax.errors import DetectorError

# name -> module that registers it (imported on first use)
BUILTIN: dict[str, str] = {
    "grood": "grood_jax.detectors.grood",
    "grood+oe": "grood_jax.detectors.grood",
    "grood[openood]": "grood_jax.detectors.grood",
    "msp": "grood_jax.detectors.msp",
    "maxlogit": "grood_jax.detectors.maxlogit",
    "energy": "grood_jax.detectors.energy",
    "odin": "grood_jax.detectors.odin",
    "mahalanobis": "grood_jax.detectors.mahalanobis",
    "knn": "grood_jax.detectors.knn",
    "vim": "grood_jax.detectors.vim",
    "react": "grood_jax.detectors.react",
    "ash": "grood_jax.detectors.ash",
    "gradnorm": "grood_jax.detectors.gradnorm",
    "she": "grood_jax.detectors.she",
    "gen": "grood_jax.detectors.gen",
    "fdbd": "grood_jax.detectors.fdbd",
    "lowdim_knn": "grood_jax.detectors.lowdim",
    "lowdim_msp": "grood_jax.detectors.lowdim",
    "lowdim_energy": "grood_jax.detectors.lowdim",
    "scale": "grood_jax.detectors.scale",
    "rmds": "grood_jax.detectors.rmds",
    "dice": "grood_jax.detectors.dice",
    "nnguide": "grood_jax.detectors.nnguide",
    "entropy": "grood_jax.detectors.entropy",
    "tempscale": "grood_jax.detectors.tempscale",
    "adascale": "grood_jax.detectors.adascale",
    "fold": "grood_jax.detectors.fold",
    "autofold": "grood_jax.detectors.fold",
}

REGISTRY: dict[str, type] = {}      # name -> class, for every detector imported so far


def register(cls):
  """Class decorator: makes `cls` (a Detector subclass with a `name`) available by name."""
  if not getattr(cls, "name", ""):
    raise TypeError(f"{cls} has no name")
  REGISTRY[cls.name] = cls
  return cls


def register_module(name: str, module: str) -> None:
  """Declares that importing `module` registers the detector `name` (imported on first use)."""
  BUILTIN[name] = module


def detector_names() -> list[str]:
  """Every detector name: built-in and registered."""
  return sorted(set(BUILTIN) | set(REGISTRY))


def detector_class(name: str):
  """The class of detector `name`, importing its module on first use."""
  if name not in REGISTRY and name in BUILTIN:
    importlib.import_module(BUILTIN[name])
  if name not in REGISTRY:
    raise DetectorError(f"unknown detector {name!r}; choose from {', '.join(detector_names())}")
  return REGISTRY[name]


def all_detectors() -> dict[str, type]:
  """{name: class} of every detector (imports them all)."""
  return {n: detector_class(n) for n in detector_names()}


def make_detector(name: str, **params):
  """A detector with `params` over its defaults; every value is type- and range-checked."""
  return detector_class(name)(**params)


def parse_detectors(spec: str) -> list[str]:
  """'grood,knn' -> ['grood', 'knn']; 'all' -> every detector name."""
  names = [s.strip() for s in spec.split(",") if s.strip()]
  if names == ["all"]:
    return detector_names()
  known = set(detector_names())
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise DetectorError(f"unknown detector(s) {unknown or spec!r}; choose from "
                        f"{', '.join(detector_names())} or 'all'")
  return names
