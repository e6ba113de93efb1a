"""GradNorm (Huang et al., 2021): the L1 norm of the gradient of KL(u || softmax(f)) with
respect to the final layer's weight W (not its bias, following METHOD.md), u uniform.

With f = W h + b, d KL / d f = p - u, so d KL / d W = (p - u) h^T and its L1 norm is

  score = ||p - u||_1 * ||h||_1,   p = softmax(f)

computed in closed form on the cached features and logits (no re-run of the model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, register


@jax.jit
def gradnorm_scores(h_NxD, logits_NxC):
  p = jax.nn.softmax(logits_NxC, axis=-1)
  return jnp.sum(jnp.abs(p - 1.0 / p.shape[-1]), axis=-1) * jnp.sum(jnp.abs(h_NxD), axis=-1)


@register
class GradNorm(Detector):
  name = "gradnorm"
  defaults = {}
  grid = {}
  description = "L1 norm of the gradient of KL(uniform || softmax) w.r.t. the last weight"

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(gradnorm_scores(ops.as_np32(split.feats),
                                           ops.as_np32(split.logits)))
