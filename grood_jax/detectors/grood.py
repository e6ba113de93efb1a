"""The `grood` detector: the adapter of GROOD's maths (grood_jax.grood) to the detector
protocol — fit prototypes and a gradient bank, score by nearest bank gradient.

fit (METHOD.md §1, Algorithm 1):
  1. class prototypes p_c = mean h over train samples of TRUE label c; early prototypes q_c
     (source="mixup" only), streamed over the train images and cached in ctx.cache;
  2. p_ood from the source (ood_sources.py);
  3. targets = the classifier's prediction argmax f(x);
  4. bank = per-sample dL/dp_ood (or dL/dp_target, wrt="class") of the CORRECTLY classified
     train samples.
score: -(squared L2 distance to the k-th nearest bank gradient) (search.py for the variants).
predict: the nearest class prototype argmin_c ||h - p_c|| (NCP prediction).

normalize=True L2-normalises every penultimate feature (train, OOD source rows, scored
splits) before anything else; prototypes are then means of unit vectors (not re-normalised).
grad="closed_form" uses the closed form of the gradient instead of autodiff (same numbers).
"""

from __future__ import annotations

import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Context, Detector, DetectorError, Param, Split, register
from grood_jax.grood import loss as _loss
from grood_jax.grood import ood_sources as _sources
from grood_jax.grood import prototypes as _protos
from grood_jax.grood import search as _search


@register
class GROOD(Detector):
  name = "grood"
  defaults = dict(source="mixup", lam=0.5, n_ood=100, k=1, wrt="ood", metric="l2", tau=1.0,
                  normalize=False, score_kind="knn", grad="autodiff")
  # 4 x 2 x 2 x 2 = 32 points; lam is left at the paper's 0.5 (it only acts for mixup, so a
  # lam axis would mostly repeat the other sources).
  grid = dict(source=["mixup", "noise", "protomean", "oodval"], tau=[1.0, 10.0], k=[1, 5],
              normalize=[False, True])
  description = ("GROOD: gradient of the nearest-class-prototype loss w.r.t. an OOD prototype, "
                 "scored by the nearest gradient of correctly classified train samples")

  specs = dict(source=Param("str", choices=_sources.SOURCES), lam=Param("float", lo=0, hi=1),
               n_ood=Param("int", lo=1), k=Param("int", lo=1), wrt=Param("str", choices=_loss.WRT),
               metric=Param("str", choices=_search.METRICS), tau=Param("float", lo=0, lo_open=True),
               normalize=Param("bool"), score_kind=Param("str", choices=_search.SCORE_KINDS),
               grad=Param("str", choices=_loss.METHODS))

  # -- helpers -------------------------------------------------------------------------------

  def _feats(self, split: Split) -> np.ndarray:
    feats = np.asarray(split.feats, np.float32)
    if self.params["normalize"]:
      feats = np.asarray(ops.l2_normalize(feats))
    return feats

  def _grads(self, state: dict, feats_NxD, targets_N) -> np.ndarray:
    p = self.params
    return _loss.batched_grads(feats_NxD, state["class_protos"], state["ood_proto"], targets_N,
                               wrt=p["wrt"], tau=float(p["tau"]), method=p["grad"])

  def _early_protos(self, ctx: Context, num_classes: int):
    train = ctx.train
    key = ("grood.early_protos", train.name, len(train))
    if key not in ctx.cache:
      if train.early is not None:
        ctx.cache[key] = _protos.class_means(train.early, train.labels, num_classes)
      elif train.images is None:
        raise DetectorError(f"grood source 'mixup' needs the images of {train.name}")
      else:
        ctx.cache[key] = _protos.early_class_means(
            ctx.fns, ctx.params, train.images, train.labels, num_classes, mean=ctx.mean,
            std=ctx.std, batch_size=ctx.batch_size)
    return np.asarray(ctx.cache[key])

  # -- protocol ------------------------------------------------------------------------------

  def fit(self, ctx: Context) -> dict:
    p = self.params
    train = ctx.train
    if train.labels is None:
      raise DetectorError(f"grood: the train split {train.name} has no labels")
    labels_N = np.asarray(train.labels)
    num_classes = int(np.asarray(train.logits).shape[1])
    feats_NxD = self._feats(train)
    try:
      class_protos = np.asarray(_protos.class_means(feats_NxD, labels_N, num_classes))
    except ValueError as e:
      raise DetectorError(f"grood: {e}") from None
    early_protos = self._early_protos(ctx, num_classes) if p["source"] == "mixup" else None
    ood_proto, _ = self.ood_prototype(ctx, class_protos, early_protos)

    preds_N = np.asarray(train.logits).argmax(-1)
    correct = preds_N == labels_N
    if correct.sum() < int(p["k"]):
      raise DetectorError(f"grood: {int(correct.sum())} correctly classified train samples, "
                          f"fewer than k={p['k']}")
    state = dict(class_protos=class_protos, ood_proto=ood_proto)
    if early_protos is not None:
      state["early_protos"] = early_protos
    state["bank"] = self._grads(state, feats_NxD[correct], preds_N[correct])
    return state

  def score(self, ctx: Context, state: dict, split: Split) -> np.ndarray:
    p = self.params
    targets_N = np.asarray(split.logits).argmax(-1)
    grads_NxD = self._grads(state, self._feats(split), targets_N)
    return _search.gradient_scores(grads_NxD, state["bank"], score_kind=p["score_kind"],
                                   k=int(p["k"]), metric=p["metric"])

  def predict(self, ctx: Context, state: dict, split: Split) -> np.ndarray:
    return _protos.nearest_prototype(self._feats(split), state["class_protos"])

  def ood_prototype(self, ctx: Context, class_protos_CxD, early_protos_CxF=None):
    """p_ood and its info from this detector's source, with the arrays taken from `ctx`."""
    p = self.params
    train = ctx.train
    mixup = dict(fns=ctx.fns, params=ctx.params, images_u8=train.images,
                 logits_NxC=train.logits, early_protos_CxF=early_protos_CxF, mean=ctx.mean,
                 std=ctx.std, batch_size=ctx.batch_size, early_NxF=train.early)
    noise = None if ctx.noise is None else (ctx.noise.feats, ctx.noise.logits)
    ood_val = None if ctx.ood_val is None else ctx.ood_val.feats
    return _sources.ood_prototype(p["source"], class_protos_CxD, lam=float(p["lam"]),
                                  n_ood=int(p["n_ood"]), seed=ctx.seed,
                                  normalize=bool(p["normalize"]), mixup=mixup, noise=noise,
                                  ood_val=ood_val)

  def check_data(self, *, num_train: int, num_classes: int, feature_dim: int) -> None:
    if self.params["k"] > num_train:
      raise DetectorError(f"grood.k={self.params['k']}: larger than the {num_train} training "
                          "samples the gradient bank is drawn from")
