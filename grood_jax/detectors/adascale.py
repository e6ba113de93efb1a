"""AdaSCALE (Regmi et al., 2025, "AdaSCALE: Adaptive scaling for OOD detection"): SCALE with a
per-sample percentile, set by how much the top activations move under a small input change.

For an input x (normalised model input) with features h, logits f and y^ = argmax f:
  g   = grad_x f_y^(x)                                (jax.grad of the batch sum; eval mode)
  x'  = x + step * sign(g) * m,   m = 1 on the floor(o * |x|) input elements of smallest |g|
  h'  = features of x',   shift = |h - h'|
  Q(x) = sum_{j in top-k1(h)} relu(h'_j) + lambda * sum_{j in top-k2(h)} shift_j
         (top-k of the unperturbed h; k1 = floor(D k1% / 100), k2 = floor(D k2% / 100))
  p(x) = p_lo + (1 - ECDF(Q(x))) (p_hi - p_lo)        (ECDF of Q over ID fit samples)
  k(x) = D - round(D p(x) / 100),   s = sum relu(h) / sum of the k(x) largest relu(h)
  variant "a" (AdaSCALE-A): score = logsumexp(W (h exp(s)) + b)
  variant "l" (AdaSCALE-L): score = logsumexp((W h + b) s^2)

Defaults are the authors' OpenOOD config: [p_lo, p_hi] = [75, 85], k1 = 5 %, k2 = 1 %,
lambda = 10, o = 0.05, step = 0.5 (added in the normalised input space, as their code),
5000 fit samples, variant "a". Differences from their code, all ours: the ECDF is fitted on a
seeded random subset of the ID *train* split (they use the ID validation split, which our
Context does not have); k1, k2 and k(x) are at least 1 (their floor can give 0 for small D);
ties among the smallest |g| and among top-k features go to the lower index. The gradient and
the perturbed forward pass run in one jitted function per padded batch of ctx.batch_size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, DetectorError, Param, register
from grood_jax.features import map_batched

VARIANTS = ("a", "l")


def top_count(dim: int, percent: float) -> int:
  """floor(dim * percent / 100), at least 1."""
  return max(1, int(dim * percent / 100.0))


def make_shift_fn(fns, n_mask: int, k1: int, k2: int):
  """jit(params, x, step, lmbda) -> (h, f, Q): features, logits and the shift statistic."""

  def max_logit_sum(x, params):
    _, h, f = fns.forward(params, x)
    y = jax.lax.stop_gradient(jnp.argmax(f, axis=-1))
    return jnp.sum(jnp.take_along_axis(f, y[:, None], axis=-1)), (h, f)

  @jax.jit
  def shift_batch(params, x, step, lmbda):
    g, (h, f) = jax.grad(max_logit_sum, has_aux=True)(x, params)
    b = x.shape[0]
    g_flat = g.reshape(b, -1)
    _, idx = jax.lax.top_k(-jnp.abs(g_flat), n_mask)           # smallest |g|, lower index first
    mask = jnp.zeros_like(g_flat).at[jnp.arange(b)[:, None], idx].set(1.0)
    x_pert = x + step * (jnp.sign(g_flat) * mask).reshape(x.shape)
    _, h_pert, _ = fns.forward(params, x_pert)
    q = shift_statistic(h, h_pert, lmbda, k1=k1, k2=k2)
    return h, f, q

  return shift_batch


@functools.partial(jax.jit, static_argnames=("k1", "k2"))
def shift_statistic(h_NxD, h_pert_NxD, lmbda, *, k1, k2):
  """Q = sum relu(h') over top-k1(h) + lmbda * sum |h - h'| over top-k2(h)."""
  _, i1 = jax.lax.top_k(h_NxD, k1)
  _, i2 = jax.lax.top_k(h_NxD, k2)
  a = jnp.sum(jnp.take_along_axis(jax.nn.relu(h_pert_NxD), i1, axis=1), axis=1)
  s = jnp.sum(jnp.take_along_axis(jnp.abs(h_NxD - h_pert_NxD), i2, axis=1), axis=1)
  return a + lmbda * s


def adaptive_percentile(q_N, ecdf_sorted_M, p_lo: float, p_hi: float) -> np.ndarray:
  """p_lo + (1 - ECDF(q)) (p_hi - p_lo), ECDF(q) = #{fit Q <= q} / M (right-continuous)."""
  ecdf = np.searchsorted(ecdf_sorted_M, np.asarray(q_N, np.float32), side="right")
  return p_lo + (1.0 - ecdf / len(ecdf_sorted_M)) * (p_hi - p_lo)


@jax.jit
def adaptive_scale(h_NxD, keep_N):
  """sum relu(h) / sum of the keep_N largest relu(h), per row (keep_N >= 1)."""
  r = jax.nn.relu(h_NxD)
  top = -jnp.sort(-r, axis=1)
  kept = jnp.sum(jnp.where(jnp.arange(r.shape[1])[None, :] < keep_N[:, None], top, 0.0), axis=1)
  return jnp.sum(r, axis=1) / jnp.where(kept != 0, kept, 1.0)


@functools.partial(jax.jit, static_argnames=("variant",))
def adascale_scores(h_NxD, keep_N, w_CxD, b_C, *, variant):
  s = adaptive_scale(h_NxD, keep_N)
  if variant == "a":
    return ops.energy_score(ops.affine(h_NxD * jnp.exp(s)[:, None], w_CxD, b_C))
  return ops.energy_score(ops.affine(h_NxD, w_CxD, b_C) * (s * s)[:, None])


@register
class AdaSCALE(Detector):
  name = "adascale"
  defaults = {"variant": "a", "p_lo": 75.0, "p_hi": 85.0, "k1": 5.0, "k2": 1.0, "lmbda": 10.0,
              "o": 0.05, "step": 0.5, "num_samples": 5000}
  specs = {"variant": Param("str", choices=VARIANTS),
           "p_lo": Param("float", lo=0, hi=100, lo_open=True, hi_open=True),
           "p_hi": Param("float", lo=0, hi=100, lo_open=True, hi_open=True),
           "k1": Param("float", lo=0, hi=100, lo_open=True, doc="% of D: top features read in h'"),
           "k2": Param("float", lo=0, hi=100, lo_open=True, doc="% of D: top features' shift"),
           "lmbda": Param("float", lo=0),
           "o": Param("float", lo=0, hi=1, doc="fraction of input elements perturbed"),
           "step": Param("float", lo=0, doc="perturbation size in the normalised input"),
           "num_samples": Param("int", lo=1, doc="ID train samples of the ECDF")}
  grid = {"p_lo": [60.0, 70.0, 75.0, 80.0], "p_hi": [85.0, 90.0, 95.0, 99.0]}
  description = ("energy of SCALE-d features with a per-sample percentile from the feature "
                 "shift under a gradient perturbation (AdaSCALE-A / -L)")

  def _shift(self, ctx, split):
    if split.images is None:
      raise DetectorError(f"adascale re-runs the model and needs the images of {split.name!r}")
    d = int(np.asarray(split.feats).shape[1])
    n_mask = max(1, int(np.prod(split.images.shape[1:]) * float(self.params["o"])))
    k1, k2 = top_count(d, self.params["k1"]), top_count(d, self.params["k2"])
    key = ("adascale_fn", id(ctx.fns), n_mask, k1, k2)
    if key not in ctx.cache:
      ctx.cache[key] = make_shift_fn(ctx.fns, n_mask, k1, k2)
    fn = ctx.cache[key]
    step, lmbda = jnp.float32(self.params["step"]), jnp.float32(self.params["lmbda"])
    return map_batched(lambda x: fn(ctx.params, x, step, lmbda), split.images,
                       mean=ctx.mean, std=ctx.std, batch_size=ctx.batch_size)

  def fit(self, ctx) -> dict:
    if self.params["p_lo"] > self.params["p_hi"]:
      raise DetectorError(f"adascale: p_lo={self.params['p_lo']} must be <= "
                          f"p_hi={self.params['p_hi']}")
    w, b = common.head_affine(ctx, "adascale")
    train = ctx.train
    n = len(train)
    m = min(n, int(self.params["num_samples"]))
    if m < n:
      rows = np.sort(np.random.default_rng(ctx.seed).choice(n, size=m, replace=False))
      train = type(train)(name=train.name + "_adascale", feats=train.feats[rows],
                          logits=train.logits[rows],
                          images=None if train.images is None else train.images[rows])
    _, _, q = self._shift(ctx, train)
    return {"ecdf_M": np.sort(np.asarray(q, np.float32)), "w_CxD": w, "b_C": b}

  def score(self, ctx, state, split) -> np.ndarray:
    h, _, q = self._shift(ctx, split)
    p = adaptive_percentile(q, state["ecdf_M"], float(self.params["p_lo"]),
                            float(self.params["p_hi"]))
    d = h.shape[1]
    keep = np.maximum(1, d - np.round(d * p / 100.0)).astype(np.int32)
    return ops.as_np32(adascale_scores(ops.as_np32(h), keep, state["w_CxD"], state["b_C"],
                                       variant=self.params["variant"]))
