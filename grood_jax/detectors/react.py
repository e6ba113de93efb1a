"""ReAct (Sun et al., 2021): energy of the logits of clipped features.

  c = p-th percentile of every element of the train features (numpy's linear interpolation)
  score = logsumexp(W min(h, c) + b)

p = 90. When the train features have more than 2^25 elements the percentile is taken over a
random subset of rows (seeded by ctx.seed) holding about 2^25 elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, Param, register

MAX_ELEMENTS = 1 << 25


@jax.jit
def react_scores(h_NxD, clip, w_CxD, b_C):
  return ops.energy_score(ops.affine(jnp.minimum(h_NxD, clip), w_CxD, b_C))


def feature_percentile(feats_NxD: np.ndarray, percentile: float, seed: int) -> np.float32:
  feats_NxD = ops.as_np32(feats_NxD)
  n, d = feats_NxD.shape
  if n * d > MAX_ELEMENTS:
    rows = np.random.default_rng(seed).choice(n, size=max(1, MAX_ELEMENTS // d), replace=False)
    feats_NxD = feats_NxD[np.sort(rows)]
  return np.float32(np.percentile(feats_NxD.ravel(), percentile))


@register
class ReAct(Detector):
  name = "react"
  defaults = {"percentile": 90.0}
  specs = {"percentile": Param("float", lo=0, hi=100)}
  grid = {"percentile": [85.0, 90.0, 95.0, 99.0]}
  description = "energy after clipping features at a train percentile"

  def fit(self, ctx) -> dict:
    w, b = common.head_affine(ctx, "react")
    clip = feature_percentile(ctx.train.feats, float(self.params["percentile"]), ctx.seed)
    return {"clip": np.asarray(clip, np.float32), "w_CxD": w, "b_C": b}

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(react_scores(ops.as_np32(split.feats), state["clip"],
                                        state["w_CxD"], state["b_C"]))
