"""Fold (Park, Jung, Lee & Lee, 2026, "Exploiting local flatness for efficient
out-of-distribution detection", arXiv 2606.29952): the curvature of the energy in feature space
on partially normalised penultimate features. OOD inputs sit where it is more curved.

What is implemented here (our reading of the abstract and of issue 16; the paper's full text
and code were not available to us, so the exact form of its partial normalisation, of how the
trace enters the score and its alpha default are NOT verified):

  z      = h / ||h||^alpha                 (alpha in [0, 1]: 0 = raw h, 1 = unit norm; the
                                            norm is a constant, z is the point of evaluation)
  E(z)   = -logsumexp(W z + b)             (the energy of the head at z)
  kappa  = -tr  d^2 E / dz^2               (>= 0; the Hessian of E is -W^T (diag p - p p^T) W,
                                            p = softmax(W z + b), so it equals
                                            sum_c p_c ||w_c||^2 - ||W^T p||^2)
  score  = -kappa                          (flat = in-distribution)

The trace is taken by automatic differentiation, in one jitted function vmapped over a padded
batch: `method` "exact" forms the D x D Hessian per sample (jax.hessian) and sums its diagonal;
"hutchinson" averages v^T H v over `probes` Rademacher vectors v (Hessian-vector products by
forward-over-reverse jax.jvp of jax.grad), the same probes for every sample, drawn from
PRNGKey(`seed`); "auto" is exact for D <= 512, else Hutchinson. The Hessian of the cross-entropy
at the predicted class equals this one (the class term is linear in z), so the score does not
depend on which of the two losses the paper differentiates.
AutoFold (alpha tuned on pseudo-OOD made by masking ID logits) is not implemented: its
construction could not be verified; choose alpha with --select on the OOD validation split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, Param, register

METHODS = ("auto", "exact", "hutchinson")
MAX_EXACT_DIM = 512


def partial_normalize(h_NxD, alpha):
  """h / ||h||^alpha per row; a zero row stays zero."""
  n = ops.safe_norm(h_NxD)[:, None]
  return h_NxD / jnp.where(n > 0, n, 1.0) ** alpha


def _energy(z_D, w_CxD, b_C):
  return -jax.nn.logsumexp(jnp.matmul(w_CxD, z_D, precision=ops.HIGHEST) + b_C)


@jax.jit
def exact_curvature(h_NxD, w_CxD, b_C, alpha):
  """-tr Hessian_z E(z) per row, the Hessian formed by jax.hessian (vmapped)."""
  z = partial_normalize(h_NxD, alpha)
  hess = jax.vmap(jax.hessian(_energy), in_axes=(0, None, None))(z, w_CxD, b_C)
  return -jnp.trace(hess, axis1=1, axis2=2)


@jax.jit
def hutchinson_curvature(h_NxD, w_CxD, b_C, alpha, probes_PxD):
  """-mean_v v^T Hessian_z E(z) v per row (Hutchinson), HVPs by jvp-of-grad (vmapped)."""
  z = partial_normalize(h_NxD, alpha)
  grad_e = jax.grad(_energy)

  def one(z_D):
    def vhv(v_D):
      return jnp.dot(v_D, jax.jvp(lambda x: grad_e(x, w_CxD, b_C), (z_D,), (v_D,))[1])
    return -jnp.mean(jax.vmap(vhv)(probes_PxD))

  return jax.vmap(one)(z)


def rademacher_probes(seed: int, probes: int, dim: int) -> np.ndarray:
  """(probes, dim) float32 of +-1 from PRNGKey(seed)."""
  return np.asarray(jax.random.rademacher(jax.random.PRNGKey(seed), (probes, dim),
                                          dtype=jnp.float32))


@register
class Fold(Detector):
  name = "fold"
  defaults = {"alpha": 0.5, "method": "auto", "probes": 64, "seed": 0}
  specs = {"alpha": Param("float", lo=0, hi=1, doc="partial normalisation h / ||h||^alpha"),
           "method": Param("str", choices=METHODS),
           "probes": Param("int", lo=1, doc="Hutchinson probe vectors"),
           "seed": Param("int", lo=0, doc="PRNG seed of the Hutchinson probes")}
  grid = {"alpha": [0.0, 0.25, 0.5, 0.75, 1.0]}
  description = ("minus the trace of the feature Hessian of the energy at h / ||h||^alpha "
                 "(Fold; exact or Hutchinson; AutoFold not included)")

  def fit(self, ctx) -> dict:
    w, b = common.head_affine(ctx, "fold")
    return {"w_CxD": w, "b_C": b}

  def _method(self, dim: int) -> str:
    m = self.params["method"]
    return ("exact" if dim <= MAX_EXACT_DIM else "hutchinson") if m == "auto" else m

  def score(self, ctx, state, split) -> np.ndarray:
    h = ops.as_np32(split.feats)
    n, d = h.shape
    alpha = jnp.float32(self.params["alpha"])
    if self._method(d) == "exact":
      fn = functools.partial(exact_curvature, alpha=alpha)
    else:
      probes = jnp.asarray(rademacher_probes(int(self.params["seed"]),
                                             int(self.params["probes"]), d))
      fn = functools.partial(hutchinson_curvature, alpha=alpha, probes_PxD=probes)
    bs = max(1, min(int(ctx.batch_size), n))
    out = np.empty(n, np.float32)
    for s in range(0, n, bs):
      hb = h[s:s + bs]
      if len(hb) < bs:
        hb = np.concatenate([hb, np.zeros((bs - len(hb), d), np.float32)])
      out[s:s + bs] = np.asarray(fn(hb, state["w_CxD"], state["b_C"]))[:min(bs, n - s)]
    return ops.as_np32(-out)
