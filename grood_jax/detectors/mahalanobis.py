"""Mahalanobis distance to class means with a tied covariance (Lee et al., 2018).

  mu_c  = mean of the train features of true class c
  Sigma = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T         (pooled, centred per class)
  score = max_c -(h - mu_c)^T Sigma^+ (h - mu_c)

Sigma^+ is the pseudo-inverse: eigen-directions with eigenvalue <= 1e-6 x the largest are
dropped (Sigma comes from float32 features, so smaller eigenvalues are noise). It is applied
by whitening: A = V_r Lambda_r^{-1/2}, z = (h - m) A, zeta_c = (mu_c - m) A with m the train
mean, so the score is -min_c ||z - zeta_c||^2, found with the exact blocked `knn_search`
(k = 1) against the C whitened class means. Classes without train samples are left out.
predict() returns the nearest class. The input pre-processing of the original paper is not
used (as in OpenOOD's MDS).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, DetectorError, register

RCOND = 1e-6


@jax.jit
def _class_stats(h_NxD, onehot_NxC):
  counts_C = jnp.sum(onehot_NxC, axis=0)
  sums_CxD = jnp.matmul(onehot_NxC.T, h_NxD, precision=ops.HIGHEST)
  means_CxD = sums_CxD / jnp.maximum(counts_C, 1.0)[:, None]
  centred = h_NxD - jnp.matmul(onehot_NxC, means_CxD, precision=ops.HIGHEST)
  cov_DxD = jnp.matmul(centred.T, centred, precision=ops.HIGHEST) / h_NxD.shape[0]
  return counts_C, means_CxD, cov_DxD, jnp.mean(h_NxD, axis=0)


@jax.jit
def whiten(h_NxD, centre_D, proj_DxR):
  """(h - centre) P: features in whitened coordinates (precision HIGHEST)."""
  return jnp.matmul(h_NxD - centre_D, proj_DxR, precision=ops.HIGHEST)


def whitening(cov_DxD, rcond: float = RCOND, who: str = "mahalanobis",
              what: str = "the within-class covariance") -> np.ndarray:
  """A (D, r) with A A^T = pinv(cov): eigenvectors over sqrt(eigenvalue), small ones dropped."""
  lam, vec = np.linalg.eigh(np.asarray(cov_DxD, np.float64))
  keep = lam > rcond * max(float(lam.max()), 0.0)
  if not keep.any():
    raise DetectorError(f"{who}: {what} of the train features is 0")
  return (vec[:, keep] / np.sqrt(lam[keep])).astype(np.float32)


def nearest_whitened(feats_NxD, centre_D, proj_DxR, protos_CxR):
  """(squared distance, index) of the nearest whitened class mean: knn_search with k = 1."""
  return ops.knn_search(whiten(ops.as_np32(feats_NxD), centre_D, proj_DxR), protos_CxR, 1)


@register
class Mahalanobis(Detector):
  name = "mahalanobis"
  defaults = {}
  grid = {}
  description = "max over classes of minus the Mahalanobis distance, tied covariance"

  def fit(self, ctx) -> dict:
    labels = common.require_labels(ctx.train, "mahalanobis")
    num_classes = int(np.asarray(ctx.train.logits).shape[1])
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    counts, means, cov, centre = _class_stats(ops.as_np32(ctx.train.feats), onehot)
    present = np.asarray(counts) > 0
    proj = whitening(cov)
    protos = whiten(np.asarray(means)[present], centre, proj)
    return {"centre_D": np.asarray(centre), "proj_DxR": proj, "protos_CxR": np.asarray(protos),
            "classes_C": np.flatnonzero(present).astype(np.int32)}

  def _nearest(self, state, split):
    return nearest_whitened(split.feats, state["centre_D"], state["proj_DxR"], state["protos_CxR"])

  def score(self, ctx, state, split) -> np.ndarray:
    d, _ = self._nearest(state, split)
    return ops.as_np32(-d[:, 0])

  def predict(self, ctx, state, split) -> np.ndarray:
    _, i = self._nearest(state, split)
    return np.asarray(state["classes_C"])[i[:, 0]]
