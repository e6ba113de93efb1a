"""RMDS, the relative Mahalanobis distance (Ren et al., 2021, "A simple fix to Mahalanobis
distance for improving near-OOD detection").

  mu_c, Sigma   class means and the tied within-class covariance (as `mahalanobis`)
  mu_0, Sigma_0 the mean and covariance of all train features (one background Gaussian)
  MD_c(h) = (h - mu_c)^T Sigma^+ (h - mu_c),   MD_0(h) = (h - mu_0)^T Sigma_0^+ (h - mu_0)
  score   = max_c -(MD_c(h) - MD_0(h)) = MD_0(h) - min_c MD_c(h)

Both covariances are 1/N sums (sklearn's EmpiricalCovariance, as OpenOOD's RMDS), accumulated
in float64; the pseudo-inverses drop eigen-directions with eigenvalue <= 1e-6 x the largest
(as our `mahalanobis`). They are applied by whitening, z = (h - m) A with A A^T = Sigma^+, and
min_c MD_c is the exact nearest whitened class mean (`ops.knn_search`, k = 1). Classes without
train samples are left out; predict() returns the nearest class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, register
from grood_jax.detectors.mahalanobis import nearest_whitened, whiten, whitening

ROWS = 1 << 16                      # rows per float64 accumulation chunk


def gaussian_stats(h_NxD, labels_N, num_classes: int):
  """(counts_C, class means_CxD, within-class cov_DxD, mean_D, total cov_DxD), float64."""
  h = np.asarray(h_NxD)
  n, d = h.shape
  counts = np.bincount(labels_N, minlength=num_classes).astype(np.float64)
  sums = np.zeros((num_classes, d))
  total = np.zeros(d)
  for s in range(0, n, ROWS):
    x = h[s:s + ROWS].astype(np.float64)
    np.add.at(sums, labels_N[s:s + ROWS], x)
    total += x.sum(0)
  means = sums / np.maximum(counts, 1.0)[:, None]
  mean = total / n
  within = np.zeros((d, d))
  full = np.zeros((d, d))
  for s in range(0, n, ROWS):
    x = h[s:s + ROWS].astype(np.float64)
    xc = x - means[labels_N[s:s + ROWS]]
    x0 = x - mean
    within += xc.T @ xc
    full += x0.T @ x0
  return counts, means, within / n, mean, full / n


@jax.jit
def _sq_norm_whitened(h_NxD, centre_D, proj_DxR):
  z = whiten(h_NxD, centre_D, proj_DxR)
  return jnp.sum(z * z, axis=1)


@register
class RMDS(Detector):
  name = "rmds"
  defaults = {}
  grid = {}
  description = "relative Mahalanobis: background MD minus the nearest class MD (tied cov.)"

  def fit(self, ctx) -> dict:
    labels = common.require_labels(ctx.train, "rmds")
    num_classes = int(np.asarray(ctx.train.logits).shape[1])
    counts, means, within, mean, full = gaussian_stats(ctx.train.feats, labels, num_classes)
    present = counts > 0
    proj = whitening(within, who="rmds", what="a covariance")
    centre = mean.astype(np.float32)
    protos = ((means[present] - mean) @ proj.astype(np.float64)).astype(np.float32)
    return {"centre_D": centre, "proj_DxR": proj, "protos_CxR": protos,
            "bg_proj_DxS": whitening(full, who="rmds", what="a covariance"),
            "classes_C": np.flatnonzero(present).astype(np.int32)}

  def _nearest(self, state, split):
    return nearest_whitened(split.feats, state["centre_D"], state["proj_DxR"], state["protos_CxR"])

  def score(self, ctx, state, split) -> np.ndarray:
    d, _ = self._nearest(state, split)
    bg = _sq_norm_whitened(ops.as_np32(split.feats), state["centre_D"], state["bg_proj_DxS"])
    return ops.as_np32(np.asarray(bg) - d[:, 0])

  def predict(self, ctx, state, split) -> np.ndarray:
    _, i = self._nearest(state, split)
    return np.asarray(state["classes_C"])[i[:, 0]]
