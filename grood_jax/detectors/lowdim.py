"""Low-dimensional gradient detectors (METHOD.md §3, seed 003).

  g(x) = d/dθ logsumexp f(x)  (all trainable parameters),  g̃ = (g − μ_train) / s_train,
  z = Vᵀ g̃  with V the top-K principal directions of the train g̃ (subspace="pca") or the
  L2-normalised class means of g̃ (subspace="classmean", K = number of classes).

  lowdim_knn     −‖ẑ − ẑ_(k)‖ on L2-normalised z against the train bank (k = 5)
  lowdim_msp     max softmax of a linear probe (BatchNorm + Linear, 10 epochs CE) on z
  lowdim_energy  logsumexp of the probe's logits

The fit (statistics, subspace, train z) uses `n_fit` train images, a subset drawn with
ctx.seed, and is cached in ctx.cache under the parameters that affect it, so the three detectors
(and grid points differing only in k or the probe's settings) share one fit; the reduced
gradients of a scored split are cached too. Every scored image is re-run through the model for
its per-sample gradient (needs the split's images). Memory: see grood_jax.lowdim.subspace.
"""

from __future__ import annotations

import jax
import numpy as np

from grood_jax.detectors import _common
from grood_jax.detectors.base import Detector, DetectorError, register
from grood_jax.lowdim import grads as _grads
from grood_jax.lowdim import probe as _probe
from grood_jax.lowdim import subspace as _subspace

_SUBSPACES = ("pca", "classmean")
_COMMON = {"subspace": "pca", "K": 64, "n_fit": 5000, "batch_size": 64, "power_iters": 4,
           "oversample": 10}


def _images(split, who):
  if split.images is None:
    raise DetectorError(f"{who} re-runs the model for per-sample gradients and needs the "
                        f"images of {split.name!r}")
  return split.images


class _Lowdim(Detector):
  needs_model = True

  # -------------------------------------------------------------- shared fit

  def _fit_key(self, ctx) -> tuple:
    p = self.params
    if p["subspace"] not in _SUBSPACES:
      raise DetectorError(f"{self.name}: subspace must be one of {_SUBSPACES}, "
                          f"got {p['subspace']!r}")
    keys = ["subspace", "n_fit", "batch_size"]
    if p["subspace"] == "pca":
      keys += ["K", "power_iters", "oversample"]
    return ("lowdim",) + tuple((k, p[k]) for k in keys) + (("seed", ctx.seed),)

  def _fitted(self, ctx) -> dict:
    """{"mean_P", "scale_P", "V_PxK", "z_NxK", "labels_N"} of the fit subset (cached)."""
    key = self._fit_key(ctx)
    if key in ctx.cache:
      return ctx.cache[key]
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
    stats = _grads.grad_stats(ctx.fns, ctx.params, images, **io)
    if p["subspace"] == "pca":
      k = int(p["K"])
      n_par = _grads.num_params(ctx.params)
      if not 1 <= k <= n_par:
        raise DetectorError(f"{self.name}: K={k} needs 1 <= K <= the number of parameters "
                            f"({n_par})")
      v, _ = _subspace.pca_subspace(ctx.fns, ctx.params, stats, images, k,
                                    key=jax.random.key(ctx.seed),
                                    power_iters=int(p["power_iters"]),
                                    oversample=int(p["oversample"]), **io)
    else:
      if labels is None:
        raise DetectorError(f"{self.name}: subspace='classmean' needs the train labels")
      v = _subspace.class_mean_subspace(ctx.fns, ctx.params, stats, images, labels,
                                        int(ctx.fns.num_classes), **io)
    z = _subspace.reduce_grads(ctx.fns, ctx.params, stats, v, images, **io)
    fitted = {"mean_P": stats["mean_P"], "scale_P": stats["scale_P"], "V_PxK": v, "z_NxK": z,
              "labels_N": labels}
    ctx.cache[key] = fitted
    return fitted

  def _base_state(self, fitted) -> dict:
    return {k: fitted[k] for k in ("mean_P", "scale_P", "V_PxK")}

  def _z(self, ctx, state, split) -> np.ndarray:
    """Reduced gradients of a split, cached per (V, images) object pair."""
    images = _images(split, self.name)
    key = ("lowdim_z", id(state["V_PxK"]), id(images))
    hit = ctx.cache.get(key)
    if hit is not None and hit[0] is state["V_PxK"] and hit[1] is images:
      return hit[2]
    stats = {"mean_P": state["mean_P"], "scale_P": state["scale_P"]}
    z = _subspace.reduce_grads(ctx.fns, ctx.params, stats, state["V_PxK"], images,
                               batch_size=int(self.params["batch_size"]), mean=ctx.mean,
                               std=ctx.std)
    ctx.cache[key] = (state["V_PxK"], images, z)
    return z


@register
class LowdimKNN(_Lowdim):
  name = "lowdim_knn"
  defaults = {**_COMMON, "k": 5, "query_block": 1024, "bank_block": 16384}
  grid = {"K": [16, 32, 64, 128], "k": [1, 5, 10, 50]}
  description = "minus the k-th NN distance of L2-normalised low-dimensional gradients"

  def fit(self, ctx) -> dict:
    fitted = self._fitted(ctx)
    return {**self._base_state(fitted),
            "bank_NxK": np.asarray(_common.l2_normalize(fitted["z_NxK"]))}

  def score(self, ctx, state, split) -> np.ndarray:
    k = int(self.params["k"])
    n = len(state["bank_NxK"])
    if not 1 <= k <= n:
      raise DetectorError(f"{self.name}: k={k} needs 1 <= k <= the bank size ({n})")
    z = _common.l2_normalize(self._z(ctx, state, split))
    d, _ = _common.knn_search(z, state["bank_NxK"], k,
                              query_block=int(self.params["query_block"]),
                              bank_block=int(self.params["bank_block"]))
    return _common.as_np32(-np.sqrt(d[:, k - 1]))


class _LowdimProbe(_Lowdim):
  defaults = {**_COMMON, "epochs": 10, "probe_lr": 1e-2, "probe_batch": 128}
  grid = {"K": [16, 32, 64, 128]}

  def fit(self, ctx) -> dict:
    fitted = self._fitted(ctx)
    if fitted["labels_N"] is None:
      raise DetectorError(f"{self.name}: the probe needs the train labels")
    p = self.params
    key = self._fit_key(ctx) + ("probe", p["epochs"], p["probe_lr"], p["probe_batch"])
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
    return _common.as_np32(_common.max_softmax(self._logits(ctx, state, split)))


@register
class LowdimEnergy(_LowdimProbe):
  name = "lowdim_energy"
  description = "energy (logsumexp) of a linear probe on low-dimensional gradients"

  def score(self, ctx, state, split) -> np.ndarray:
    return _common.as_np32(_common.energy(self._logits(ctx, state, split)))
