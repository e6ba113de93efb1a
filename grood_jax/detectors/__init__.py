"""Detectors: one module each, one protocol (base.py), one lazy registry (registry.py).

  from grood_jax.detectors import make_detector, Context
  det = make_detector("knn", k=10); state = det.fit(ctx); scores = det.score(ctx, state, split)

Importing this package imports no detector: each is loaded when first asked for by name.
"""

from grood_jax.detectors.base import Context, Detector, DetectorError, Param, Split
from grood_jax.detectors.registry import (REGISTRY, all_detectors, detector_class,
                                          detector_names, make_detector, parse_detectors,
                                          register, register_module)

__all__ = ["Context", "Detector", "DetectorError", "Param", "Split", "REGISTRY",
           "all_detectors", "detector_class", "detector_names", "make_detector",
           "parse_detectors", "register", "register_module"]
