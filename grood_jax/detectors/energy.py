"""Energy score (Liu et al., 2020): T * logsumexp(f / T), the negative free energy; T = 1."""

from __future__ import annotations

import jax
import numpy as np

from grood_jax.detectors import _common
from grood_jax.detectors.base import Detector, register


@jax.jit
def energy_scores(logits_NxC, temperature):
  return _common.energy(logits_NxC, temperature)


@register
class Energy(Detector):
  name = "energy"
  defaults = {"T": 1.0}
  grid = {"T": [1.0]}
  description = "T * logsumexp(logits / T)"

  def score(self, ctx, state, split) -> np.ndarray:
    return _common.as_np32(energy_scores(_common.as_np32(split.logits),
                                         float(self.params["T"])))
