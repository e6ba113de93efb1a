"""fDBD, fast decision-boundary distance (Liu & Qin, 2024).

  score = 1/(C-1) sum_{j != y^} (f_y^ - f_j) / ||w_y^ - w_j||  /  ||h - mu||

where w_c are the rows of the final layer W (f = W h + b), y^ = argmax f and mu is the mean
train feature (normalizer "distance"; "norm" divides by ||h|| instead, OpenOOD's alternative).
(f_y^ - f_j) / ||w_y^ - w_j|| is the distance of h to the boundary between y^ and j. We
average over the C - 1 classes as the paper describes; OpenOOD sums them, which only scales
every score by C - 1 (same ranking). A pair of identical rows (||w_y^ - w_j|| = 0) contributes 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, DetectorError, Param, register

NORMALIZERS = ("distance", "norm")


def inverse_boundary_norms(w_CxD: np.ndarray) -> np.ndarray:
  """(C, C) 1 / ||w_i - w_j||, 0 on the diagonal and for identical rows."""
  w = np.asarray(w_CxD, np.float64)
  sq = np.sum(w * w, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (w @ w.T), 0.0)
  np.fill_diagonal(d2, 0.0)
  dist = np.sqrt(d2)
  return np.where(dist > 0, 1.0 / np.where(dist > 0, dist, 1.0), 0.0).astype(np.float32)


@jax.jit
def fdbd_scores(h_NxD, logits_NxC, inv_norms_CxC, centre_D):
  y = jnp.argmax(logits_NxC, axis=1)
  gap_NxC = jnp.max(logits_NxC, axis=1, keepdims=True) - logits_NxC
  mean_dist = jnp.sum(gap_NxC * inv_norms_CxC[y], axis=1) / (logits_NxC.shape[1] - 1)
  return mean_dist / jnp.linalg.norm(h_NxD - centre_D, axis=1)


@register
class FDBD(Detector):
  name = "fdbd"
  defaults = {"normalizer": "distance"}
  specs = {"normalizer": Param("str", choices=NORMALIZERS)}
  grid = {"normalizer": list(NORMALIZERS)}
  description = "mean distance to the decision boundaries over the distance to the train mean"

  def _normalizer(self) -> str:
    normalizer = self.params["normalizer"]
    if normalizer not in NORMALIZERS:
      raise DetectorError(f"fdbd: normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    return normalizer

  def fit(self, ctx) -> dict:
    self._normalizer()
    w, _ = common.head_affine(ctx, "fdbd")
    if w.shape[0] < 2:
      raise DetectorError("fdbd needs at least 2 classes")
    mean = ops.as_np32(ctx.train.feats).mean(axis=0, dtype=np.float64)
    return {"inv_norms_CxC": inverse_boundary_norms(w), "mean_D": mean.astype(np.float32)}

  def score(self, ctx, state, split) -> np.ndarray:
    centre = state["mean_D"] if self._normalizer() == "distance" else np.zeros_like(state["mean_D"])
    return ops.as_np32(fdbd_scores(ops.as_np32(split.feats), ops.as_np32(split.logits),
                                       state["inv_norms_CxC"], centre))
