"""Metrics against sklearn, hand-computed FPR@95 cases, invariances and input checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from grood_jax import metrics as M


def _sk_fpr_at_tpr(pos, neg, tpr=0.95):
  y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
  fpr, tp, _ = skm.roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
  return fpr[np.argmax(tp >= tpr)]


def _sk_all(s_id, s_ood):
  y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
  s = np.r_[s_id, s_ood]
  return {
      "auroc": skm.roc_auc_score(y, s),
      "aupr_in": skm.average_precision_score(y, s),
      "aupr_out": skm.average_precision_score(1 - y, -s),
      "fpr95": _sk_fpr_at_tpr(s_id, s_ood),
      "fpr95_openood": _sk_fpr_at_tpr(-s_ood, -s_id),
  }


def _cases():
  rng = np.random.default_rng(0)
  cases = []
  for n_id, n_ood in [(1, 1), (3, 7), (20, 20), (37, 101), (500, 300), (1000, 2000)]:
    cases.append((rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)))
    # Heavy ties: a handful of integer levels.
    cases.append((rng.integers(0, 5, n_id), rng.integers(-1, 3, n_ood)))
    cases.append((rng.integers(0, 2, n_id), rng.integers(0, 2, n_ood)))
  cases.append((np.full(50, 3.0), np.full(40, 3.0)))      # all tied
  cases.append((np.arange(10.0), np.arange(10.0) + 100))  # perfectly inverted
  cases.append((np.arange(10.0) + 100, np.arange(10.0)))  # perfectly separated
  return cases


@pytest.mark.parametrize("case", range(len(_cases())))
def test_against_sklearn(case):
  s_id, s_ood = _cases()[case]
  ours = M.ood_metrics(s_id, s_ood)
  ref = _sk_all(s_id, s_ood)
  assert set(ours) == set(M.METRIC_NAMES)
  for k in M.METRIC_NAMES:
    assert isinstance(ours[k], float)
    assert 0.0 <= ours[k] <= 1.0
    assert ours[k] == pytest.approx(ref[k], abs=1e-12), k
  # The single-metric functions agree with ood_metrics.
  assert M.auroc(s_id, s_ood) == ours["auroc"]
  assert M.aupr_in(s_id, s_ood) == ours["aupr_in"]
  assert M.aupr_out(s_id, s_ood) == ours["aupr_out"]
  assert M.fpr95(s_id, s_ood) == ours["fpr95"]
  assert M.fpr95_openood(s_id, s_ood) == ours["fpr95_openood"]


def test_roc_curve_matches_sklearn():
  rng = np.random.default_rng(1)
  s_id, s_ood = rng.integers(0, 6, 80), rng.integers(-2, 4, 60)
  fpr, tpr, thr = M.roc_curve(s_id, s_ood)
  y = np.r_[np.ones(80), np.zeros(60)]
  f2, t2, th2 = skm.roc_curve(y, np.r_[s_id, s_ood], drop_intermediate=False)
  np.testing.assert_allclose(fpr, f2)
  np.testing.assert_allclose(tpr, t2)
  np.testing.assert_array_equal(thr[1:], th2[1:])


def test_fpr95_worked_example():
  # The docstring example. ID = 1..20: 95 % of 20 = 19 accepted -> t = 2.
  # OOD = ten 0s + 10..19. Classic: OOD >= 2 are 10..19 -> 10/20 = 0.5.
  # OpenOOD: 19th smallest OOD = 18 -> ID <= 18 are 1..18 -> 18/20 = 0.9.
  s_id = np.arange(1, 21)
  s_ood = np.r_[np.zeros(10), np.arange(10, 20)]
  assert M.fpr95(s_id, s_ood) == 0.5
  assert M.fpr95_openood(s_id, s_ood) == 0.9


def test_fpr95_small_cases_by_hand():
  # n_id = 10: ceil(9.5) = 10 ID must be accepted -> t = min(ID) = 0.1.
  # OOD >= 0.1: 0.1 (tie counts as accepted), 0.5 -> 2/4.
  s_id = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
  s_ood = np.array([0.0, 0.05, 0.1, 0.5])
  assert M.fpr95(s_id, s_ood) == 0.5
  # OpenOOD: n_ood = 4, ceil(3.8) = 4 OOD caught -> t = max(OOD) = 0.5;
  # ID <= 0.5: 0.1..0.5 -> 5/10.
  assert M.fpr95_openood(s_id, s_ood) == 0.5

  # n_id = 40: 38 must be accepted -> t = 3rd smallest ID = 2.
  # OOD = 0,1,2,2,3 -> >= 2: three of five.
  s_id = np.arange(40)
  s_ood = np.array([0, 1, 2, 2, 3])
  assert M.fpr95(s_id, s_ood) == pytest.approx(3 / 5)
  # OpenOOD: 5 OOD -> all 5 caught -> t = 3; ID <= 3: 0,1,2,3 -> 4/40.
  assert M.fpr95_openood(s_id, s_ood) == pytest.approx(4 / 40)

  # Ties at the threshold: everything equal -> everything accepted / flagged.
  assert M.fpr95(np.full(20, 5.0), np.full(20, 5.0)) == 1.0
  assert M.fpr95_openood(np.full(20, 5.0), np.full(20, 5.0)) == 1.0
  # Perfect separation: both conventions give 0.
  assert M.fpr95(np.arange(20) + 100, np.arange(20)) == 0.0
  assert M.fpr95_openood(np.arange(20) + 100, np.arange(20)) == 0.0


def test_auroc_hand_computed_with_ties():
  # Pairs (id, ood): id = [1, 2], ood = [1, 0]:
  # (1,1) tie 0.5, (1,0) win, (2,1) win, (2,0) win -> 3.5 / 4.
  assert M.auroc([1, 2], [1, 0]) == 0.875


_transforms = [
    lambda x: 3.0 * x + 7.0,
    lambda x: np.exp(x / 50.0),
    lambda x: np.arctan(x / 50.0),
    lambda x: x ** 3 - 5.0,
]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-100, 100), min_size=1, max_size=60),
       st.lists(st.integers(-100, 100), min_size=1, max_size=60),
       st.sampled_from(range(len(_transforms))))
def test_invariant_to_monotone_transforms(s_id, s_ood, t_idx):
  # Integer inputs keep ties and stay well separated, so these float transforms are strictly
  # increasing on them without rounding collisions.
  s_id, s_ood = np.array(s_id, np.float64), np.array(s_ood, np.float64)
  f = _transforms[t_idx]
  a = M.ood_metrics(s_id, s_ood)
  b = M.ood_metrics(f(s_id), f(s_ood))
  for k in M.METRIC_NAMES:
    assert b[k] == pytest.approx(a[k], abs=1e-12), k


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
       st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
       st.lists(st.floats(1e-3, 1e3), min_size=120, max_size=120),
       st.floats(-1e3, 1e3))
def test_invariant_to_arbitrary_monotone_map(s_id, s_ood, steps, offset):
  # An arbitrary strictly increasing map: the i-th distinct value goes to offset + sum(steps[:i+1]).
  s_id, s_ood = np.array(s_id), np.array(s_ood)
  u = np.unique(np.r_[s_id, s_ood])
  v = offset + np.cumsum(steps[:u.size])
  g = lambda x: v[np.searchsorted(u, x)]
  a = M.ood_metrics(s_id, s_ood)
  b = M.ood_metrics(g(s_id), g(s_ood))
  for k in M.METRIC_NAMES:
    assert b[k] == pytest.approx(a[k], abs=1e-12), k


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40),
       st.lists(st.integers(-3, 3), min_size=1, max_size=40))
def test_tied_integers_against_sklearn_property(s_id, s_ood):
  s_id, s_ood = np.array(s_id), np.array(s_ood)
  ours, ref = M.ood_metrics(s_id, s_ood), _sk_all(s_id, s_ood)
  for k in M.METRIC_NAMES:
    assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_swapping_roles_mirrors():
  rng = np.random.default_rng(2)
  s_id, s_ood = rng.normal(size=50), rng.normal(size=70)
  assert M.auroc(s_id, s_ood) == pytest.approx(1 - M.auroc(s_ood, s_id))
  assert M.aupr_out(s_id, s_ood) == pytest.approx(M.aupr_in(-s_ood, -s_id))
  assert M.fpr95_openood(s_id, s_ood) == M.fpr95(-s_ood, -s_id)


@pytest.mark.parametrize("fn", [M.auroc, M.aupr_in, M.aupr_out, M.fpr95, M.fpr95_openood,
                                M.ood_metrics])
def test_non_finite_raises(fn):
  good = np.arange(5.0)
  with pytest.raises(ValueError, match=r"scores_id has 2 non-finite.*2 NaN, 0 Inf"):
    fn(np.array([0.0, np.nan, 1.0, np.nan]), good)
  with pytest.raises(ValueError, match=r"scores_ood has 1 non-finite.*0 NaN, 1 Inf"):
    fn(good, np.array([0.0, -np.inf]))
  with pytest.raises(ValueError, match="scores_ood is empty"):
    fn(good, np.array([]))
  with pytest.raises(ValueError, match="1-D"):
    fn(good[:, None], good)


def test_accuracy():
  assert M.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
  assert M.accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="differ in length"):
    M.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match="empty"):
    M.accuracy([], [])
