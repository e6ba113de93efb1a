"""Fold and AutoFold (Park, Jung, Lee & Lee, ECCV 2026, "Exploiting local flatness for efficient
out-of-distribution detection", arXiv 2606.29952): the trace of the feature-space Hessian of
the energy loss at partially normalised penultimate features; OOD inputs sit where it is more
curved. Formulas and defaults read from the authors' code (github.com/shpark97/Fold, commit
0992c49, `openood/postprocessors/{fold,autofold}_postprocessor.py` and
`configs/postprocessors/{fold,autofold}.yml`); this is our own implementation of them:

  z      = h / ||h||^alpha                 (partial feature normalisation; a zero row stays 0)
  p      = softmax(W z + b)
  kappa  = tr W^T (diag p - p p^T) W       (= -tr d^2 E/dz^2 for E(z) = -logsumexp(W z + b);
                                            closed form sum_c p_c ||w_c||^2 - ||W^T p||^2)
  score  = -kappa / n(z)                   (flat = in-distribution), with the score
                                            normalisation `norm`:
             "weight"  n = ||W^T p||^2      (the authors' `norm: true`, all benchmarks but
                                            ImageNet-1K)
             "feature" n = ||z||^2          (their `norm: true` on ImageNet-1K)
             "none"    n = 1                (their `norm: false`)
           n is clamped below at 1e-7 (as in their AutoFold).

Defaults as their fold.yml: alpha = 0.1, norm = "weight"; the --select grid is theirs too,
alpha in {0.1, ..., 1.0} x norm in {none, weight} (their code narrows alpha to 0.1-0.5 on
ImageNet and 0.6-1.0 on CIFAR; our benchmarks are neither, so the whole list is searched).

The trace is taken by automatic differentiation (their code forms W^T H_z W explicitly), in
one jitted function vmapped over a padded batch: `method` "exact" forms the D x D Hessian per
sample (jax.hessian) and sums its diagonal; "hutchinson" averages v^T H v over `probes`
Rademacher vectors v (Hessian-vector products by forward-over-reverse jax.jvp of jax.grad),
the same probes for every sample, drawn from PRNGKey(`seed`); "auto" is exact for D <= 512,
else Hutchinson.

AutoFold (`autofold`) picks alpha without any OOD data, as the authors' AutoFold does: on
labelled ID validation samples, for each held-out class k the logit k of every sample is
masked (set to -inf, so p_k = 0) and the Fold scores recomputed from the masked softmax; the
AUROC of the other classes' samples (ID) against class k's samples (pseudo-OOD) is averaged
over the held-out classes, and alpha is the first of {0.01, 0.02, ..., 1.00} with the
largest average (AUROCs that cannot be formed, a class with no samples, are skipped; if no
average exceeds 0, alpha stays at their fallback 0.4). Held-out classes: all classes present
when there are at most `max_classes` (20), else `max_classes` of those with >= 3 samples,
drawn without replacement by numpy's RandomState(`class_seed` = 42). The calibration is closed form in
float64 (their G = W W^T trick: kappa = p . diag G - p^T G p); the test scores then go
through the same autodiff path as Fold. Where we differ from their code: (1) the calibration
set is `ctx.id_val` when the Context carries one with labels, else (`calib` = "auto") the ID
training split, whose samples the network was trained on (their code always uses the ID
validation split; our harness's Context may carry none); at most `calib_max` samples are used
(a seeded subset when there are more); (2) alpha is calibrated with this setting's own `norm`
(in their code the calibration runs once with the config's norm = true and their --select
then sweeps norm without recalibrating); (3) "feature" normalisation is offered to AutoFold
too (their AutoFold has only "weight").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import softmax

from grood_jax import metrics, ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, DetectorError, Param, register

METHODS = ("auto", "exact", "hutchinson")
NORMS = ("none", "weight", "feature")
MAX_EXACT_DIM = 512
NORM_FLOOR = 1e-7
ALPHA_CANDIDATES = tuple(round(0.01 * i, 2) for i in range(1, 101))   # AutoFold's alphas
FALLBACK_ALPHA = 0.4


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


@functools.partial(jax.jit, static_argnames="norm")
def score_normalizer(h_NxD, w_CxD, b_C, alpha, norm: str):
  """The divisor n(z) of the curvature per row (>= 1e-7): ||W^T p||^2, ||z||^2 or 1."""
  z = partial_normalize(h_NxD, alpha)
  if norm == "none":
    return jnp.ones(z.shape[0], z.dtype)
  if norm == "feature":
    n = jnp.sum(z * z, axis=1)
  else:
    p = jax.nn.softmax(jnp.matmul(z, w_CxD.T, precision=ops.HIGHEST) + b_C, axis=1)
    pw = jnp.matmul(p, w_CxD, precision=ops.HIGHEST)
    n = jnp.sum(pw * pw, axis=1)
  return jnp.maximum(n, NORM_FLOOR)


def rademacher_probes(seed: int, probes: int, dim: int) -> np.ndarray:
  """(probes, dim) float32 of +-1 from PRNGKey(seed)."""
  return np.asarray(jax.random.rademacher(jax.random.PRNGKey(seed), (probes, dim),
                                          dtype=jnp.float32))


def masked_fold_scores(z_NxD, w_CxD, b_C, k: int, norm: str) -> np.ndarray:
  """Fold scores (float64, closed form) of normalised features z with logit k masked out."""
  logits = z_NxD @ w_CxD.T + b_C
  logits[:, k] = -np.inf
  p = softmax(logits, axis=1)
  g = w_CxD @ w_CxD.T
  kappa = p @ np.diag(g) - np.einsum("nc,nc->n", p @ g, p)
  if norm == "weight":
    kappa = kappa / np.maximum(np.sum((p @ w_CxD) ** 2, axis=1), NORM_FLOOR)
  elif norm == "feature":
    kappa = kappa / np.maximum(np.sum(z_NxD ** 2, axis=1), NORM_FLOOR)
  return -kappa


def held_out_classes(labels_N, num_classes: int, max_classes: int, seed: int) -> np.ndarray:
  """The classes AutoFold masks: every class present in labels_N when there are at most
  max_classes of them, else a seeded draw of max_classes among those with >= 3 samples."""
  present = np.unique(labels_N)
  if len(present) <= max_classes:
    return present
  counts = np.bincount(labels_N, minlength=num_classes)
  valid = present[counts[present] >= 3]
  pick = np.random.RandomState(seed).choice(len(valid), min(max_classes, len(valid)),
                                            replace=False)
  return valid[pick]


def calibrate_alpha(h_NxD, labels_N, w_CxD, b_C, *, norm: str = "weight", max_classes: int = 20,
                    class_seed: int = 42, alphas=ALPHA_CANDIDATES,
                    fallback: float = FALLBACK_ALPHA) -> tuple[float, np.ndarray]:
  """AutoFold's alpha from labelled ID samples by logit masking (see the module docstring):
  (chosen alpha, mean pseudo-OOD AUROC per candidate alpha), in float64."""
  h = np.asarray(h_NxD, np.float64)
  w, b = np.asarray(w_CxD, np.float64), np.asarray(b_C, np.float64)
  y = np.asarray(labels_N, np.int64)
  classes = held_out_classes(y, len(b), max_classes, class_seed)
  n = np.linalg.norm(h, axis=1, keepdims=True)
  n = np.where(n > 0, n, 1.0)
  curve = np.zeros(len(alphas))
  best_alpha, best = float(fallback), 0.0
  for i, alpha in enumerate(alphas):
    z = h / n ** alpha
    aucs = []
    for k in classes:
      out = y == k
      if out.all() or not out.any():
        continue
      s = masked_fold_scores(z, w, b, int(k), norm)
      aucs.append(metrics.auroc(s[~out], s[out]))
    curve[i] = np.mean(aucs) if aucs else 0.0
    if curve[i] > best:
      best, best_alpha = curve[i], float(alpha)
  return best_alpha, curve


class _FoldScoring(Detector):
  """The scoring both Fold and AutoFold share: -curvature / normaliser at a given alpha."""

  def _method(self, dim: int) -> str:
    m = self.params["method"]
    return ("exact" if dim <= MAX_EXACT_DIM else "hutchinson") if m == "auto" else m

  def _fold_scores(self, ctx, state, split, alpha: float) -> np.ndarray:
    h = ops.as_np32(split.feats)
    n, d = h.shape
    alpha = jnp.float32(alpha)
    if self._method(d) == "exact":
      fn = functools.partial(exact_curvature, alpha=alpha)
    else:
      probes = jnp.asarray(rademacher_probes(int(self.params["seed"]),
                                             int(self.params["probes"]), d))
      fn = functools.partial(hutchinson_curvature, alpha=alpha, probes_PxD=probes)
    norm = functools.partial(score_normalizer, alpha=alpha, norm=self.params["norm"])
    bs = max(1, min(int(ctx.batch_size), n))
    out = np.empty(n, np.float32)
    for s in range(0, n, bs):
      hb = h[s:s + bs]
      if len(hb) < bs:
        hb = np.concatenate([hb, np.zeros((bs - len(hb), d), np.float32)])
      kappa = fn(hb, state["w_CxD"], state["b_C"]) / norm(hb, state["w_CxD"], state["b_C"])
      out[s:s + bs] = np.asarray(kappa)[:min(bs, n - s)]
    return ops.as_np32(-out)


_COMMON_SPECS = {"norm": Param("str", choices=NORMS,
                               doc="score normalisation: / ||W^T p||^2, / ||z||^2 or none"),
                 "method": Param("str", choices=METHODS),
                 "probes": Param("int", lo=1, doc="Hutchinson probe vectors"),
                 "seed": Param("int", lo=0, doc="PRNG seed of the Hutchinson probes")}


@register
class Fold(_FoldScoring):
  name = "fold"
  defaults = {"alpha": 0.1, "norm": "weight", "method": "auto", "probes": 64, "seed": 0}
  specs = {"alpha": Param("float", lo=0, hi=1, doc="partial normalisation h / ||h||^alpha"),
           **_COMMON_SPECS}
  grid = {"alpha": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
          "norm": ["none", "weight"]}
  description = ("minus the trace of the feature Hessian of the energy at h / ||h||^alpha, "
                 "divided by ||W^T p||^2 (norm=weight) or not (Fold, the authors' code)")

  def fit(self, ctx) -> dict:
    w, b = common.head_affine(ctx, "fold")
    return {"w_CxD": w, "b_C": b}

  def score(self, ctx, state, split) -> np.ndarray:
    return self._fold_scores(ctx, state, split, self.params["alpha"])


@register
class AutoFold(_FoldScoring):
  name = "autofold"
  defaults = {"norm": "weight", "calib": "auto", "calib_max": 10000, "max_classes": 20,
              "class_seed": 42, "method": "auto", "probes": 64, "seed": 0}
  specs = {**_COMMON_SPECS,
           "calib": Param("str", choices=("auto", "id_val", "train"),
                          doc="calibration samples: ctx.id_val, the ID train split, or "
                              "id_val when present else train"),
           "calib_max": Param("int", lo=2, doc="at most this many calibration samples"),
           "max_classes": Param("int", lo=1, doc="held-out (masked) classes at most"),
           "class_seed": Param("int", lo=0, doc="RandomState seed of the held-out classes")}
  grid = {"norm": ["none", "weight"]}
  description = ("Fold with alpha calibrated on ID samples alone: the alpha that best "
                 "separates each class's samples, its logit masked, from the rest (AutoFold)")

  def _calibration_split(self, ctx):
    val = getattr(ctx, "id_val", None)
    mode = self.params["calib"]
    if mode == "id_val" or (mode == "auto" and val is not None and val.labels is not None):
      if val is None:
        raise DetectorError("autofold.calib='id_val' needs a labelled ID validation split "
                            "as ctx.id_val; this Context has none")
      return val
    return ctx.train

  def fit(self, ctx) -> dict:
    w, b = common.head_affine(ctx, "autofold")
    if len(b) < 2:
      raise DetectorError("autofold needs at least 2 classes (one is masked)")
    split = self._calibration_split(ctx)
    labels = common.require_labels(split, "autofold's calibration")
    h = np.asarray(split.feats)
    cap = int(self.params["calib_max"])
    if len(h) > cap:
      keep = np.sort(np.random.default_rng(int(self.params["class_seed"])).choice(
          len(h), cap, replace=False))
      h, labels = h[keep], labels[keep]
    alpha, curve = calibrate_alpha(h, labels, w, b, norm=self.params["norm"],
                                   max_classes=int(self.params["max_classes"]),
                                   class_seed=int(self.params["class_seed"]))
    return {"w_CxD": w, "b_C": b, "alpha": np.asarray(alpha, np.float32),
            "calib_auroc_A": curve.astype(np.float32)}

  def score(self, ctx, state, split) -> np.ndarray:
    return self._fold_scores(ctx, state, split, float(state["alpha"]))
