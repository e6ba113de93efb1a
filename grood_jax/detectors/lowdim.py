"""Low-dimensional gradient detectors (METHOD.md §3, seed 003).

  g(x) = d/dθ logsumexp f(x)  (all trainable parameters),  g̃ = (g − μ_train) / s_train,
  z = Vᵀ g̃  with V the top-K principal directions of the train g̃ (subspace="pca") or the
  L2-normalised class means of g̃ (subspace="classmean", K = number of classes).

  lowdim_knn     −‖ẑ − ẑ_(k)‖ on L2-normalised z against the train bank (k = 5)
  lowdim_msp     max softmax of a linear probe (BatchNorm + Linear, 10 epochs CE) on z
  lowdim_energy  logsumexp of the probe's logits

The fit (statistics, subspace, train z) uses `n_fit` train images, a subset drawn with
ctx.seed; their per-sample gradients are computed once and kept for the fit's passes (1 model
pass instead of power_iters + 3) when n_fit × P float32 fit in `grad_cache_mib` (2 GiB by
default; above it they are recomputed per pass, memory O(B·P)). The fit is cached in ctx.cache under the parameters that affect it, so the three detectors
(and grid points differing only in k or the probe's settings) share one fit; the reduced
gradients of a scored split are cached too. Every scored image is re-run through the model for
its per-sample gradient (needs the split's images). Memory: see grood_jax.lowdim.subspace.
"""

from __future__ import annotations

import jax
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, DetectorError, Param, register
from grood_jax.detectors.knn import shared_knn_dists
from grood_jax.lowdim import grads as _grads
from grood_jax.lowdim import probe as _probe
from grood_jax.lowdim import subspace as _subspace

_SUBSPACES = ("pca", "classmean")
_COMMON = {"subspace": "pca", "K": 64, "n_fit": 5000, "batch_size": 64, "power_iters": 4,
           "oversample": 10, "grad_cache_mib": 2048}


def _images(split, who):
  if split.images is None:
    raise DetectorError(f"{who} re-runs the model for per-sample gradients and needs the "
                        f"images of {split.name!r}")
  return split.images


class _Lowdim(Detector):
  specs = {"subspace": Param("str", choices=_SUBSPACES), "K": Param("int", lo=1),
           "n_fit": Param("int", lo=1), "batch_size": Param("int", lo=1),
           "power_iters": Param("int", lo=0), "oversample": Param("int", lo=0),
           "k": Param("int", lo=1), "query_block": Param("int", lo=1),
           "bank_block": Param("int", lo=1), "epochs": Param("int", lo=1),
           "probe_lr": Param("float", lo=0, lo_open=True), "probe_batch": Param("int", lo=1)}

  # -------------------------------------------------------------- shared fit

  def _basis_k(self, ctx) -> int:
    """Columns of the fitted PCA basis: max(K, largest K of the grid), at most P.

    Every K of the grid is the leading K columns of one basis (Rayleigh–Ritz orders them by
    variance), so a search over K costs one gradient pass per data set instead of one per K,
    and each K's subspace is at least as accurate as a fit at that K alone (more oversampling).
    """
    k = int(self.params["K"])
    n_par = _grads.num_params(ctx.params)
    if not 1 <= k <= n_par:
      raise DetectorError(f"{self.name}: K={k} needs 1 <= K <= the number of parameters "
                          f"({n_par})")
    return min(max([k] + [int(v) for v in self.grid.get("K", [])]), n_par)

  def _fit_key(self, ctx) -> tuple:
    p = self.params
    if p["subspace"] not in _SUBSPACES:
      raise DetectorError(f"{self.name}: subspace must be one of {_SUBSPACES}, "
                          f"got {p['subspace']!r}")
    keys = ["subspace", "n_fit", "batch_size"]
    extra = ()
    if p["subspace"] == "pca":
      keys += ["power_iters", "oversample"]
      extra = (("K_basis", self._basis_k(ctx)),)
    return ("lowdim",) + tuple((k, p[k]) for k in keys) + extra + (("seed", ctx.seed),)

  def _fitted(self, ctx) -> dict:
    """{"mean_P", "scale_P", "V_PxK", "z_NxK", "labels_N"} of the fit subset (cached), with
    V and z sliced to this detector's K."""
    key = self._fit_key(ctx)
    if key not in ctx.cache:
      ctx.cache[key] = self._fit_basis(ctx, key)
    full = ctx.cache[key]
    kk = full["V_PxK"].shape[1] if self.params["subspace"] != "pca" else int(self.params["K"])
    slice_key = key + ("K", kk)
    if slice_key not in ctx.cache:  # one object per K, shared by the detectors of that K
      ctx.cache[slice_key] = {**full, "V_PxK": full["V_PxK"][:, :kk], "z_NxK": full["z_NxK"][:, :kk],
                              "basis": full["V_PxK"], "fit_key": key}
    return ctx.cache[slice_key]

  def _fit_basis(self, ctx, key) -> dict:
    p = self.params
    train = ctx.train
    images = _images(train, self.name)
    n = len(images)
    n_fit = int(min(int(p["n_fit"]), n))
    rng = np.random.default_rng(ctx.seed)
    idx = np.sort(rng.choice(n, n_fit, replace=False)) if n_fit < n else np.arange(n)
    images = images[idx]
    labels = None if train.labels is None else np.asarray(train.labels, np.int32)[idx]
    bs = int(p["batch_size"])
    io = dict(batch_size=bs, mean=ctx.mean, std=ctx.std)
    # the fit set's per-sample gradients, computed once for all the passes below when they fit
    # in grad_cache_mib (same arrays either way: same results)
    images = _grads.GradBatches(ctx.fns, ctx.params, images,
                                keep_bytes=int(p["grad_cache_mib"]) * 2 ** 20, **io)
    stats = _grads.grad_stats(ctx.fns, ctx.params, images, **io)
    if p["subspace"] == "pca":
      v, _ = _subspace.pca_subspace(ctx.fns, ctx.params, stats, images, self._basis_k(ctx),
                                    key=jax.random.key(ctx.seed),
                                    power_iters=int(p["power_iters"]),
                                    oversample=int(p["oversample"]), **io)
    else:
      if labels is None:
        raise DetectorError(f"{self.name}: subspace='classmean' needs the train labels")
      v = _subspace.class_mean_subspace(ctx.fns, ctx.params, stats, images, labels,
                                        int(ctx.fns.num_classes), **io)
    z = _subspace.reduce_grads(ctx.fns, ctx.params, stats, v, images, **io)
    return {"mean_P": stats["mean_P"], "scale_P": stats["scale_P"], "V_PxK": v, "z_NxK": z,
            "labels_N": labels}

  def _base_state(self, fitted) -> dict:
    return {k: fitted[k] for k in ("mean_P", "scale_P", "V_PxK", "basis")}

  def _z(self, ctx, state, split) -> np.ndarray:
    """Reduced gradients of a split: computed once per (basis, images) in the context and
    sliced to this state's K; without a cached basis, computed from the state alone."""
    images = _images(split, self.name)
    v = state["V_PxK"]
    basis = state.get("basis", v)
    key = ("lowdim_z", id(basis), id(images))
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not basis or hit[1] is not images:
      stats = {"mean_P": state["mean_P"], "scale_P": state["scale_P"]}
      z = _subspace.reduce_grads(ctx.fns, ctx.params, stats, basis, images,
                                 batch_size=int(self.params["batch_size"]), mean=ctx.mean,
                                 std=ctx.std)
      hit = (basis, images, z)
      ctx.cache[key] = hit
    return hit[2][:, :v.shape[1]]


@register
class LowdimKNN(_Lowdim):
  name = "lowdim_knn"
  defaults = {**_COMMON, "k": 5, "query_block": 1024, "bank_block": 16384}
  grid = {"K": [16, 32, 64, 128], "k": [1, 5, 10, 50]}
  description = "minus the k-th NN distance of L2-normalised low-dimensional gradients"

  def fit(self, ctx) -> dict:
    fitted = self._fitted(ctx)
    return {**self._base_state(fitted),
            "bank_NxK": np.asarray(ops.l2_normalize(fitted["z_NxK"]))}

  def score(self, ctx, state, split) -> np.ndarray:
    k = int(self.params["k"])
    n = len(state["bank_NxK"])
    if not 1 <= k <= n:
      raise DetectorError(f"{self.name}: k={k} needs 1 <= k <= the bank size ({n})")
    # the bank and the queries are fixed by the cached basis slice (V of this K) and the images
    d = shared_knn_dists(ctx, (state["V_PxK"], _images(split, self.name)),
                         lambda: ops.l2_normalize(self._z(ctx, state, split)), state["bank_NxK"],
                         k, self.grid.get("k", ()),
                         query_block=int(self.params["query_block"]),
                         bank_block=int(self.params["bank_block"]))
    return ops.as_np32(-np.sqrt(d[:, k - 1]))


class _LowdimProbe(_Lowdim):
  defaults = {**_COMMON, "epochs": 10, "probe_lr": 1e-2, "probe_batch": 128}
  grid = {"K": [16, 32, 64, 128]}

  def fit(self, ctx) -> dict:
    fitted = self._fitted(ctx)
    if fitted["labels_N"] is None:
      raise DetectorError(f"{self.name}: the probe needs the train labels")
    p = self.params
    key = self._fit_key(ctx) + ("K", fitted["V_PxK"].shape[1], "probe", p["epochs"], p["probe_lr"],
                                 p["probe_batch"])
    if key not in ctx.cache:
      ctx.cache[key] = _probe.train_probe(fitted["z_NxK"], fitted["labels_N"],
                                          int(ctx.fns.num_classes), seed=ctx.seed,
                                          epochs=int(p["epochs"]), lr=float(p["probe_lr"]),
                                          batch_size=int(p["probe_batch"]))[0]
    return {**self._base_state(fitted), "probe": ctx.cache[key]}

  def _logits(self, ctx, state, split):
    return _probe.probe_logits(state["probe"], self._z(ctx, state, split))

  def predict(self, ctx, state, split) -> np.ndarray:
    return np.asarray(self._logits(ctx, state, split)).argmax(-1)


@register
class LowdimMSP(_LowdimProbe):
  name = "lowdim_msp"
  description = "max softmax of a linear probe on low-dimensional gradients"

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(ops.max_softmax(self._logits(ctx, state, split)))


@register
class LowdimEnergy(_LowdimProbe):
  name = "lowdim_energy"
  description = "energy (logsumexp) of a linear probe on low-dimensional gradients"

  def score(self, ctx, state, split) -> np.ndarray:
    return ops.as_np32(ops.energy_score(self._logits(ctx, state, split)))
