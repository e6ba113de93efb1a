"""MSP (Hendrycks & Gimpel, 2017): the maximum softmax probability, max_c softmax(f)_c."""

from __future__ import annotations

import jax
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, register


@jax.jit
def msp_scores(logits_NxC):
  return ops.max_softmax(logits_NxC)


@register
class MSP(Detector):
  name = "msp"
  defaults = {}
  grid = {}
  description = "maximum softmax probability"
  uses_train_logits = False

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(msp_scores(ops.as_np32(split.logits)))
