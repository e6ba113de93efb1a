"""Energy score (Liu et al., 2020): T * logsumexp(f / T), the negative free energy; T = 1."""

from __future__ import annotations

import jax
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, Param, register


@jax.jit
def energy_scores(logits_NxC, temperature):
  return ops.energy_score(logits_NxC, temperature)


@register
class Energy(Detector):
  name = "energy"
  defaults = {"T": 1.0}
  specs = {"T": Param("float", lo=0, lo_open=True)}
  grid = {"T": [1.0]}
  description = "T * logsumexp(logits / T)"
  uses_train_logits = False

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(energy_scores(ops.as_np32(split.logits),
                                         float(self.params["T"])))
