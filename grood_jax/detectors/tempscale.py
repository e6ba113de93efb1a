"""Temperature-scaled MSP (Guo et al., 2017, used as an OOD score by pytorch-ood / OpenOOD):

  score = max_c softmax(f / T)_c

T (param `T`): a number > 0, or "nll": the T that minimises the mean negative log-likelihood
  NLL(T) = mean_i [logsumexp(f_i / T) - f_{i, y_i} / T]
of an ID *validation* split with labels (as Guo et al. and OpenOOD's temp_scaling, which fits
it with L-BFGS from T = 1.5). "nll" reads `ctx.id_val` (a labelled `Split`: score.py sets it
to the benchmark's ID validation split) and raises DetectorError when a Context has none;
it never fits T on the training split (train logits are over-confident, their NLL-optimal T is
biased low). The default is a fixed T = 1.5 (OpenOOD's starting value, a choice of ours), and
--select picks T from the grid on the OOD validation split. `fit_temperature` is exposed for
callers that hold their own validation logits: a bounded scalar minimisation of NLL over
log T in float64 (NLL is convex in 1/T, so the minimum is unique).
"""

from __future__ import annotations

import jax
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from grood_jax import ops
from grood_jax.detectors.base import Detector, DetectorError, Param, register

LOG_T_BOUNDS = (np.log(1e-2), np.log(1e3))


def nll(logits_NxC, labels_N, temperature: float) -> float:
  """Mean negative log-likelihood of the true labels at temperature T (float64)."""
  f = np.asarray(logits_NxC, np.float64) / float(temperature)
  y = np.asarray(labels_N, np.int64)
  return float(np.mean(logsumexp(f, axis=1) - f[np.arange(len(f)), y]))


def fit_temperature(logits_NxC, labels_N) -> float:
  """argmin_T NLL(T) over T in [0.01, 1000] (bounded Brent search on log T, float64)."""
  logits_NxC = np.asarray(logits_NxC, np.float64)
  if logits_NxC.ndim != 2 or len(logits_NxC) == 0 or len(labels_N) != len(logits_NxC):
    raise DetectorError("tempscale: fitting T needs (N, C) logits and N labels, N >= 1")
  res = minimize_scalar(lambda lt: nll(logits_NxC, labels_N, np.exp(lt)), bounds=LOG_T_BOUNDS,
                        method="bounded", options={"xatol": 1e-6})
  return float(np.exp(res.x))


@jax.jit
def tempscale_scores(logits_NxC, temperature):
  return ops.max_softmax(logits_NxC, temperature)


@register
class TempScale(Detector):
  name = "tempscale"
  defaults = {"T": 1.5}
  specs = {"T": Param("float", lo=0, lo_open=True, choices=("nll",),
                      doc="temperature, or 'nll': fitted on ctx.id_val by NLL")}
  grid = {"T": [0.5, 1.0, 1.5, 2.0, 5.0, 10.0, 100.0, 1000.0]}
  description = ("max softmax of logits / T; T fixed (default 1.5, grid for --select) or "
                 "'nll' = fitted by NLL on an ID validation split (ctx.id_val)")

  def fit(self, ctx) -> dict:
    t = self.params["T"]
    if t == "nll":
      val = getattr(ctx, "id_val", None)
      if val is None or val.labels is None:
        raise DetectorError("tempscale: T='nll' fits T on a labelled ID validation split "
                            "(ctx.id_val), and this context has none; give a number for T")
      t = fit_temperature(val.logits, val.labels)
    return {"T": np.asarray(t, np.float32)}

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(tempscale_scores(ops.as_np32(split.logits), state["T"]))
