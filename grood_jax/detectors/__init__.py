"""Detectors: one module each, one protocol (base.py), one registry.

Importing this package registers every detector.
"""

import importlib

from grood_jax.detectors.base import (REGISTRY, Context, Detector, DetectorError, Split,
                                      make_detector, parse_detectors, register)

_MODULES = [
    "grood_jax.grood.detector",     # grood
    "grood_jax.detectors.msp", "grood_jax.detectors.maxlogit", "grood_jax.detectors.energy",
    "grood_jax.detectors.odin", "grood_jax.detectors.mahalanobis", "grood_jax.detectors.knn",
    "grood_jax.detectors.vim", "grood_jax.detectors.react", "grood_jax.detectors.ash",
    "grood_jax.detectors.gradnorm", "grood_jax.detectors.she", "grood_jax.detectors.gen",
    "grood_jax.detectors.fdbd", "grood_jax.detectors.lowdim",
]

for _m in _MODULES:
  importlib.import_module(_m)
