"""SCALE (Xu et al., ICLR 2024, "Scaling for training time and post-hoc out-of-distribution
detection enhancement"): ASH's rescaling without its pruning.

  k  = D - round(D p / 100)                     (at least 1)
  s1 = sum_j h_j,   s2 = sum of the k largest h_j
  h' = h * exp(s1 / s2)                         (every activation kept, all scaled alike)
  score = logsumexp(W h' + b)

p = 85 (the percentile of the authors' OpenOOD config; their sweep 65..95 is the grid). The
pruning only serves to compute s2: the original, unpruned h is scaled. Applied to the pooled
penultimate feature h (as the authors' ResNet code: the pooled feature viewed as (B, D, 1, 1)).
A sample with s2 = 0 (all-zero features) gets scale exp(0) = 1. k is a traced argument (one
compilation per feature shape for the whole grid): s2 sums the k largest over a length-D row
with the others zeroed (may differ from a length-k sum in the last bit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, Param, register


def kept_count(dim: int, percentile: float) -> int:
  """k = D - round(D p / 100), at least 1 (numpy's round half to even, as the authors)."""
  return max(1, dim - int(np.round(dim * percentile / 100.0)))


@jax.jit
def _scale_factor(h_NxD, keep):
  d = h_NxD.shape[1]
  s1 = jnp.sum(h_NxD, axis=1)
  top_NxD = jax.lax.top_k(h_NxD, d)[0]
  s2 = jnp.sum(jnp.where(jnp.arange(d)[None, :] < keep, top_NxD, 0.0), axis=1)
  return s1 / jnp.where(s2 != 0, s2, 1.0)


def scale_factor(h_NxD, *, keep):
  """s1 / s2 per row (N,): the sum over the sum of the `keep` largest elements (traced)."""
  return _scale_factor(h_NxD, np.int32(keep))


@jax.jit
def _scale_scores(h_NxD, w_CxD, b_C, keep):
  r_N = _scale_factor(h_NxD, keep)
  return ops.energy_score(ops.affine(h_NxD * jnp.exp(r_N)[:, None], w_CxD, b_C))


def scale_scores(h_NxD, w_CxD, b_C, *, keep):
  """logsumexp(W (h exp(s1 / s2)) + b) (N,); `keep` is traced (one compilation per shape)."""
  return _scale_scores(h_NxD, w_CxD, b_C, np.int32(keep))


@register
class SCALE(Detector):
  name = "scale"
  defaults = {"percentile": 85.0}
  specs = {"percentile": Param("float", lo=0, hi=100, hi_open=True)}
  grid = {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}
  description = "energy of features scaled by exp(sum / top-k sum) (SCALE, p = 85)"

  def fit(self, ctx) -> dict:
    w, b = common.head_affine(ctx, "scale")
    return {"w_CxD": w, "b_C": b}

  def score(self, ctx, state, split) -> np.ndarray:
    h = ops.as_np32(split.feats)
    return ops.as_np32(scale_scores(h, state["w_CxD"], state["b_C"],
                                    keep=kept_count(h.shape[1], float(self.params["percentile"]))))
