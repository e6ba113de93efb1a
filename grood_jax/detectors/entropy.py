"""Entropy: the negative predictive entropy (as pytorch-ood's `Entropy` detector, sign flipped
so that higher = more in-distribution).

  p = softmax(f),   score = -H(p) = sum_c p_c log p_c          (in (-log C, 0])

log p is taken as log_softmax(f) (no log of a rounded-to-zero probability).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, register


@jax.jit
def neg_entropy(logits_NxC):
  """sum_c p_c log p_c of p = softmax(f), per row."""
  logp = jax.nn.log_softmax(logits_NxC, axis=-1)
  return jnp.sum(jnp.exp(logp) * logp, axis=-1)


@register
class Entropy(Detector):
  name = "entropy"
  defaults = {}
  grid = {}
  description = "minus the entropy of the softmax, sum_c p_c log p_c"
  uses_train_logits = False

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(neg_entropy(ops.as_np32(split.logits)))
