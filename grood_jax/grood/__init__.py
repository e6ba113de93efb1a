"""GROOD: gradient-aware OOD detection (METHOD.md §1).

  prototypes.py   class / early / OOD prototypes as one pytree, class means by true label
  ood_sources.py  where the OOD prototype comes from: mixup (paper), noise, protomean, oodval
  loss.py         nearest-class-prototype (NCP) loss, safe norm, per-sample gradients
  search.py       gradient-bank nearest-neighbour scores (blocked exact search)
  detector.py     the `grood` detector (fit / score / predict)

This package imports nothing eagerly: `grood_jax.detectors` imports `grood.detector`, and the
detector imports the modules above, so an eager import here would make an import cycle.
"""
