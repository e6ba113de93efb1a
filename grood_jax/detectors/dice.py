"""DICE (Sun & Li, ECCV 2022): directed sparsification of the last layer, then energy.

  m_j    = mean of feature j over the train split
  V_cj   = m_j W_cj                              (contribution of unit j to class c, on ID data)
  t      = p-th percentile of all C x D entries of V (numpy's linear interpolation)
  M_cj   = 1[V_cj > t]                           (keeps the top (100 - p) % contributions)
  score  = logsumexp((M * W) h + b)

p = 90 (the default of the authors and OpenOOD; the grid 10..90 is ours). predict() uses the
sparsified logits, as the authors' postprocessor. The mean is accumulated in float64.
"""

from __future__ import annotations

import jax
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, Param, register


def dice_mask(mean_act_D, w_CxD, sparsity: float) -> np.ndarray:
  """The 0/1 (C, D) mask keeping contributions above the `sparsity`-th percentile."""
  contrib = np.asarray(mean_act_D, np.float64)[None, :] * np.asarray(w_CxD, np.float64)
  return (contrib > np.percentile(contrib, sparsity)).astype(np.float32)


@jax.jit
def dice_logits(h_NxD, masked_w_CxD, b_C):
  return ops.affine(h_NxD, masked_w_CxD, b_C)


@jax.jit
def dice_scores(h_NxD, masked_w_CxD, b_C):
  return ops.energy_score(dice_logits(h_NxD, masked_w_CxD, b_C))


@register
class DICE(Detector):
  name = "dice"
  defaults = {"sparsity": 90.0}
  specs = {"sparsity": Param("float", lo=0, hi=100, hi_open=True,
                             doc="percentile p of weight x mean-activation contributions dropped")}
  grid = {"sparsity": [10.0, 30.0, 50.0, 70.0, 90.0]}
  description = "energy after keeping the top (100-p)% weight contributions (DICE, p = 90)"

  def fit(self, ctx) -> dict:
    w, b = common.head_affine(ctx, "dice")
    mean_act = np.mean(np.asarray(ctx.train.feats, np.float64), axis=0)
    mask = dice_mask(mean_act, w, float(self.params["sparsity"]))
    return {"masked_w_CxD": (w * mask).astype(np.float32), "b_C": b}

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(dice_scores(ops.as_np32(split.feats), state["masked_w_CxD"], state["b_C"]))

  def predict(self, ctx, state, split) -> np.ndarray:
    return np.asarray(dice_logits(ops.as_np32(split.feats), state["masked_w_CxD"],
                                  state["b_C"])).argmax(-1)
