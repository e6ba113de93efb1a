"""SHE, simplified Hopfield energy (Zhang et al., 2023).

  m_c = mean feature of the train samples of class c that the model classifies correctly
  score = <h, m_y^>,  y^ = argmax f

A class without a correctly classified train sample gets m_c = 0 (score 0 for samples
predicted as that class).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, register


@jax.jit
def _patterns(h_NxD, logits_NxC, labels_N):
  c = logits_NxC.shape[1]
  correct = (jnp.argmax(logits_NxC, axis=1) == labels_N).astype(jnp.float32)
  onehot = jax.nn.one_hot(labels_N, c, dtype=jnp.float32) * correct[:, None]
  sums = jnp.matmul(onehot.T, h_NxD, precision=ops.HIGHEST)
  return sums / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)[:, None]


@jax.jit
def she_scores(h_NxD, logits_NxC, patterns_CxD):
  m_NxD = patterns_CxD[jnp.argmax(logits_NxC, axis=1)]
  return jnp.sum(h_NxD * m_NxD, axis=1)


@register
class SHE(Detector):
  name = "she"
  defaults = {}
  grid = {}
  description = "inner product with the mean feature of the predicted class"

  def fit(self, ctx) -> dict:
    labels = common.require_labels(ctx.train, "she")
    return {"patterns_CxD": np.asarray(_patterns(ops.as_np32(ctx.train.feats),
                                                 ops.as_np32(ctx.train.logits), labels))}

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(she_scores(ops.as_np32(split.feats), ops.as_np32(split.logits),
                                      state["patterns_CxD"]))
