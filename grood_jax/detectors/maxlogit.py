"""MaxLogit (Hendrycks et al., 2022): the largest logit, max_c f_c."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, register


@jax.jit
def maxlogit_scores(logits_NxC):
  return jnp.max(logits_NxC, axis=-1)


@register
class MaxLogit(Detector):
  name = "maxlogit"
  defaults = {}
  grid = {}
  description = "maximum logit"
  uses_train_logits = False

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(maxlogit_scores(ops.as_np32(split.logits)))
