"""ViM, virtual-logit matching (Wang et al., 2022).

  u = -W^+ b                       (W (C, D) maps h to f = W h + b; W^+ its pseudo-inverse)
  R = the eigenvectors of the D - D_p smallest eigenvalues of (1/N) sum (h - u)(h - u)^T
      over the train features (second moment about u, as OpenOOD: assume_centered),
      accumulated in float64
  r(h) = ||R^T (h - u)||             (the residual outside the principal subspace)
  alpha = mean(max_c f_c) / mean(r(h)) over the train split
  score = logsumexp(f) - alpha r(h)

D_p (param `dim`): "auto" = 1000 if D >= 1500, 512 if D >= 768, else D // 2; an int is used
as is; a float in (0, 1) is a fraction of D (rounded). 1 <= D_p < D is required.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, DetectorError, Param, register


def principal_dim(dim, d: int) -> int:
  if dim == "auto":
    p = 1000 if d >= 1500 else 512 if d >= 768 else d // 2
  elif isinstance(dim, float) and 0.0 < dim < 1.0:
    p = int(round(dim * d))
  elif isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
    p = int(dim)
  else:
    raise DetectorError(f"vim: dim must be 'auto', an int or a fraction in (0, 1), got {dim!r}")
  if not 1 <= p < d:
    raise DetectorError(f"vim: the principal dimension {p} must be in [1, {d - 1}] (D = {d})")
  return p


ROWS = 1 << 16                      # rows per float64 accumulation chunk


def second_moment(h_NxD, u_D) -> np.ndarray:
  """(1/N) sum (h - u)(h - u)^T accumulated in float64 (numpy, in chunks of ROWS rows).

  Float32 accumulation loses the small eigen-directions ViM keeps as its residual space when
  the features share a large offset or their spectrum is wide (1.9 % off on such features)."""
  h_NxD = np.asarray(h_NxD)
  u = np.asarray(u_D, np.float64)
  acc = np.zeros((h_NxD.shape[1], h_NxD.shape[1]))
  for s in range(0, len(h_NxD), ROWS):
    x = h_NxD[s:s + ROWS].astype(np.float64) - u
    acc += x.T @ x
  return acc / len(h_NxD)


@jax.jit
def residual_norm(h_NxD, u_D, resid_DxR):
  return jnp.linalg.norm(jnp.matmul(h_NxD - u_D, resid_DxR, precision=ops.HIGHEST), axis=1)


@jax.jit
def vim_scores(h_NxD, logits_NxC, u_D, resid_DxR, alpha):
  return ops.energy_score(logits_NxC) - alpha * residual_norm(h_NxD, u_D, resid_DxR)


@register
class ViM(Detector):
  name = "vim"
  defaults = {"dim": "auto"}
  specs = {"dim": Param("number", lo=0, lo_open=True, choices=("auto",))}
  grid = {"dim": [0.25, 0.5, 0.75]}
  description = "energy minus the scaled feature residual outside the principal subspace"

  def fit(self, ctx) -> dict:
    w, b = common.head_affine(ctx, "vim")
    h = ops.as_np32(ctx.train.feats)
    p = principal_dim(self.params["dim"], h.shape[1])
    u = (-np.linalg.pinv(w.astype(np.float64)) @ b.astype(np.float64)).astype(np.float32)
    lam, vec = np.linalg.eigh(second_moment(h, u))                 # float64, ascending
    resid = vec[:, :h.shape[1] - p].astype(np.float32)
    r_train = np.asarray(residual_norm(h, u, resid), np.float64)
    max_logit = np.asarray(ctx.train.logits, np.float64).max(axis=1)
    alpha = max_logit.mean() / max(r_train.mean(), np.finfo(np.float32).tiny)
    return {"u_D": u, "resid_DxR": resid, "alpha": np.asarray(alpha, np.float32)}

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(vim_scores(ops.as_np32(split.feats), ops.as_np32(split.logits),
                                      state["u_D"], state["resid_DxR"], state["alpha"]))
