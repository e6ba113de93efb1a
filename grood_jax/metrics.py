"""OOD-detection metrics (numpy only).

Convention: a detector's score is HIGHER for samples it believes are in-distribution (ID).
Every function takes `scores_id` and `scores_ood`, two 1-D arrays of finite scores.

  auroc          ID positive; exact with ties (Mann-Whitney form: P(s_id > s_ood) + P(=)/2).
  aupr_in        average precision, ID positive, score as is.
  aupr_out       average precision, OOD positive, score negated.
  fpr95          classic FPR@95: fraction of OOD accepted when >= 95 % of ID is accepted.
  fpr95_openood  OpenOOD v1.5 FPR@95: fraction of ID rejected when >= 95 % of OOD is caught.

Average precision follows sklearn's `average_precision_score` (step-wise sum over the distinct
thresholds, tied scores forming one threshold), so the numbers match sklearn to rounding.
OpenOOD itself reports AUPR via trapezoidal `auc(recall, precision)`; we do not.
"""

from __future__ import annotations

import math

import numpy as np

METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood")


def _as_scores(x, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of scores, got shape {a.shape}")
  if a.size == 0:
    raise ValueError(f"{name} is empty: need at least one score")
  try:
    a = a.astype(np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be numeric, got dtype {a.dtype}") from e
  bad = ~np.isfinite(a)
  if bad.any():
    n_nan = int(np.isnan(a).sum())
    n_inf = int(bad.sum()) - n_nan
    raise ValueError(f"{name} has {int(bad.sum())} non-finite score(s) of {a.size} "
                     f"({n_nan} NaN, {n_inf} Inf)")
  return a


def _check(scores_id, scores_ood) -> tuple[np.ndarray, np.ndarray]:
  return _as_scores(scores_id, "scores_id"), _as_scores(scores_ood, "scores_ood")


def auroc(scores_id, scores_ood) -> float:
  """Area under the ROC curve with ID as the positive class.

  Computed exactly as the Mann-Whitney statistic: the fraction of (ID, OOD) pairs with
  s_id > s_ood, tied pairs counting one half (equal to sklearn's roc_auc_score).
  """
  s_id, s_ood = _check(scores_id, scores_ood)
  ood_sorted = np.sort(s_ood)
  below = np.searchsorted(ood_sorted, s_id, side="left")
  below_or_tied = np.searchsorted(ood_sorted, s_id, side="right")
  # Integer counts: exact for any realistic size.
  twice_u = 2 * int(below.sum()) + int((below_or_tied - below).sum())
  return twice_u / (2 * s_id.size * s_ood.size)


def _counts_per_threshold(pos: np.ndarray, neg: np.ndarray):
  """(thresholds descending, true positives, false positives) when accepting score >= each
  distinct score; higher score = more positive."""
  s = np.concatenate([pos, neg])
  y = np.concatenate([np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)])
  order = np.argsort(-s, kind="mergesort")
  s, y = s[order], y[order]
  # Last index of each run of tied scores: one threshold per distinct score.
  last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
  tps = np.cumsum(y)[last]
  return s[last], tps, (last + 1) - tps


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
  """sklearn's average precision; higher score = more positive."""
  _, tps, fps = _counts_per_threshold(pos, neg)
  precision = tps / (tps + fps)
  recall = tps / pos.size
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(scores_id, scores_ood) -> float:
  """Average precision with ID as the positive class (scores as is)."""
  s_id, s_ood = _check(scores_id, scores_ood)
  return _average_precision(s_id, s_ood)


def aupr_out(scores_id, scores_ood) -> float:
  """Average precision with OOD as the positive class (scores negated)."""
  s_id, s_ood = _check(scores_id, scores_ood)
  return _average_precision(-s_ood, -s_id)


def _fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, tpr: float) -> float:
  """Fraction of `neg` with score >= t, t the largest threshold with mean(pos >= t) >= tpr."""
  if not 0.0 < tpr <= 1.0:
    raise ValueError(f"tpr must be in (0, 1], got {tpr}")
  n = pos.size
  # Smallest k with k / n >= tpr, compared in floating point exactly as sklearn's roc_curve
  # does (tps / n >= tpr), so the two agree even when tpr * n is not representable.
  k = max(1, min(n, math.ceil(tpr * n)))
  while k > 1 and (k - 1) / n >= tpr:
    k -= 1
  while k < n and k / n < tpr:
    k += 1
  t = -np.partition(-pos, k - 1)[k - 1]  # k-th largest positive score
  return float(np.mean(neg >= t))


def fpr95(scores_id, scores_ood, tpr: float = 0.95) -> float:
  """Classic FPR@95 (ODIN, KNN, ViM, ...): fraction of OOD accepted at 95 % ID acceptance.

  A sample is accepted (called ID) when its score is >= t; a score equal to t is accepted.
  t is the largest threshold such that mean(scores_id >= t) >= 0.95, i.e. the k-th largest ID
  score with k = ceil(0.95 * n_id); the result is mean(scores_ood >= t). This equals sklearn's
  `fpr[argmax(tpr >= 0.95)]` from `roc_curve(y_is_id, score, drop_intermediate=False)`.

  Worked example: ID = 1, 2, ..., 20 (n = 20, so k = 19 and t = 2: 19 of 20 ID scores are >= 2);
  OOD = ten 0s and 10, 11, ..., 19. OOD accepted (>= 2): 10..19, so FPR95 = 10 / 20 = 0.5.
  """
  s_id, s_ood = _check(scores_id, scores_ood)
  return _fpr_at_tpr(s_id, s_ood, tpr)


def fpr95_openood(scores_id, scores_ood, tpr: float = 0.95) -> float:
  """OpenOOD v1.5 FPR@95: fraction of ID rejected at 95 % OOD detection.

  The mirror of `fpr95` with the roles swapped: OOD is the positive class with score -s. A
  sample is flagged OOD when s <= t (a score equal to t is flagged). t is the smallest threshold
  such that mean(scores_ood <= t) >= 0.95, i.e. the k-th smallest OOD score with
  k = ceil(0.95 * n_ood); the result is mean(scores_id <= t). This equals OpenOOD's
  `fpr[argmax(tpr >= 0.95)]` from `roc_curve(y_is_ood, -score)` (taken without
  drop_intermediate, which can only move OpenOOD's value on collinear ROC segments).

  Worked example (same data as `fpr95`): ID = 1, ..., 20; OOD = ten 0s and 10, ..., 19.
  n_ood = 20, k = 19: the 19th smallest OOD score is t = 18 (19 of 20 OOD scores are <= 18).
  ID flagged (<= 18): 1..18, so FPR95-OpenOOD = 18 / 20 = 0.9, while the classic FPR95 is 0.5.
  """
  s_id, s_ood = _check(scores_id, scores_ood)
  return _fpr_at_tpr(-s_ood, -s_id, tpr)


def roc_curve(scores_id, scores_ood) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve with ID positive: (fpr, tpr, thresholds), thresholds descending.

  One point per distinct score (accept when score >= threshold), preceded by (0, 0) at
  threshold +inf, as sklearn's roc_curve(..., drop_intermediate=False).
  """
  s_id, s_ood = _check(scores_id, scores_ood)
  distinct, tps, fps = _counts_per_threshold(s_id, s_ood)
  fpr = np.r_[0.0, fps / s_ood.size]
  tpr = np.r_[0.0, tps / s_id.size]
  thresholds = np.r_[np.inf, distinct]
  return fpr, tpr, thresholds


def accuracy(pred, labels) -> float:
  """Fraction of correct predictions. `pred` is (N,) class ids or (N, C) logits (argmax)."""
  p = np.asarray(pred)
  y = np.asarray(labels)
  if p.ndim == 2:
    p = p.argmax(axis=-1)
  if p.ndim != 1 or y.ndim != 1:
    raise ValueError(f"pred must be (N,) or (N, C) and labels (N,); got {np.shape(pred)} "
                     f"and {y.shape}")
  if p.shape != y.shape:
    raise ValueError(f"pred and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
  if p.size == 0:
    raise ValueError("pred and labels are empty")
  return float(np.mean(p == y))


def ood_metrics(scores_id, scores_ood) -> dict[str, float]:
  """All five OOD metrics as plain floats in [0, 1]: auroc, aupr_in, aupr_out, fpr95,
  fpr95_openood."""
  s_id, s_ood = _check(scores_id, scores_ood)
  return {
      "auroc": auroc(s_id, s_ood),
      "aupr_in": _average_precision(s_id, s_ood),
      "aupr_out": _average_precision(-s_ood, -s_id),
      "fpr95": _fpr_at_tpr(s_id, s_ood, 0.95),
      "fpr95_openood": _fpr_at_tpr(-s_ood, -s_id, 0.95),
  }
