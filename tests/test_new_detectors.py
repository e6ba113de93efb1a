"""The detectors of issue 16 against independent numpy float64 transcriptions of their papers'
formulas, on a tiny real backbone (a random SmallCNN) and on synthetic features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp, softmax

from grood_jax.detectors import (Context, DetectorError, Split, detector_names, make_detector)
from grood_jax.detectors.fold import rademacher_probes
from grood_jax.detectors.tempscale import fit_temperature, nll
from grood_jax.features import extract, normalize
from grood_jax.modelfns import ModelFns
from grood_jax.models.cnn import SmallCNN

NEW = ["scale", "rmds", "dice", "nnguide", "entropy", "tempscale", "adascale", "fold",
       "autofold"]
C, D = 4, 8
MEAN, STD = 0.3, 0.4


@pytest.fixture(autouse=True)
def _full_precision():
  with jax.default_matmul_precision("highest"):
    yield


def close(a, b, rtol=1e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1e-6, float(np.abs(b).max())))


@pytest.fixture(scope="module")
def cnn():
  model = SmallCNN(num_classes=C, width=4, feature_dim=D, rngs=nnx.Rngs(0))
  fns = ModelFns(model)
  rng = np.random.default_rng(0)
  tr_img = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
  te_img = rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
  tr_lab = rng.integers(0, C, 64).astype(np.int32)

  def split(name, images, labels=None):
    f = extract(fns, fns.params, images, mean=MEAN, std=STD, batch_size=24)
    return Split(name, f.feats, f.logits, images=images, labels=labels)

  train = split("train", tr_img, tr_lab)
  test = split("test", te_img, rng.integers(0, C, 32).astype(np.int32))
  ctx = Context(fns=fns, params=fns.params, mean=MEAN, std=STD, train=train, batch_size=24)
  w = np.asarray(model.fc.kernel[...], np.float64).T   # (C, D): f = W h + b
  b = np.asarray(model.fc.bias[...], np.float64)
  return ctx, test, w, b


def run(name, ctx, split, **params):
  det = make_detector(name, **params)
  state = det.fit(ctx)
  s = det.score(ctx, state, split)
  assert s.dtype == np.float32 and s.shape == (len(split),)
  assert np.all(np.isfinite(s))
  return s, det, state


def test_registered_with_grid_and_specs():
  for name in NEW:
    assert name in detector_names()
    det = make_detector(name)
    assert det.description and set(det.grid) <= set(det.defaults)
    assert det.grid_points()
    for key, vals in det.grid.items():
      for v in vals:
        make_detector(name, **{key: v})          # every grid value passes its spec
  for name, bad in [("scale", {"percentile": 100.0}), ("dice", {"sparsity": -1.0}),
                    ("nnguide", {"K": 0}), ("fold", {"alpha": 1.5}), ("fold", {"method": "x"}),
                    ("fold", {"norm": True}), ("autofold", {"calib": "test"}),
                    ("autofold", {"alpha": 0.5}),
                    ("adascale", {"variant": "b"}), ("adascale", {"p_hi": 100.0}),
                    ("tempscale", {"T": 0.0}), ("tempscale", {"T": "fit"})]:
    with pytest.raises(DetectorError):
      make_detector(name, **bad)


# ------------------------------------------------------------------ SCALE


def _numpy_scale_features(h, pct):
  h = h.astype(np.float64)
  k = max(1, h.shape[1] - int(np.round(h.shape[1] * pct / 100.0)))
  s2 = np.sort(h, axis=1)[:, ::-1][:, :k].sum(1)
  return h * np.exp(h.sum(1) / s2)[:, None]


def test_scale(cnn):
  ctx, test, w, b = cnn
  for pct in [65.0, 85.0, 95.0]:
    ref = logsumexp(_numpy_scale_features(test.feats, pct) @ w.T + b, axis=1)
    close(run("scale", ctx, test, percentile=pct)[0], ref)
  # not the plain energy: the scaling matters on these features
  assert np.abs(run("scale", ctx, test)[0] - logsumexp(test.feats @ w.T + b, axis=1)).max() > 1e-2


# ------------------------------------------------------------------ DICE


def test_dice(cnn):
  ctx, test, w, b = cnn
  m = ctx.train.feats.astype(np.float64).mean(0)
  for p in [10.0, 50.0, 90.0]:
    contrib = m[None, :] * w
    mask = contrib > np.percentile(contrib, p)
    assert 0 < mask.sum() < mask.size
    logits = test.feats.astype(np.float64) @ (w * mask).T + b
    s, det, state = run("dice", ctx, test, sparsity=p)
    close(s, logsumexp(logits, axis=1))
    np.testing.assert_array_equal(det.predict(ctx, state, test), logits.argmax(1))


# ------------------------------------------------------------------ RMDS


def test_rmds(cnn):
  ctx, test, _, _ = cnn
  h, y = ctx.train.feats.astype(np.float64), ctx.train.labels
  mu = np.stack([h[y == c].mean(0) for c in range(C)])
  cen = h - mu[y]
  prec = np.linalg.pinv(cen.T @ cen / len(h))
  mu0 = h.mean(0)
  prec0 = np.linalg.pinv((h - mu0).T @ (h - mu0) / len(h))
  x = test.feats.astype(np.float64)
  diff = x[:, None, :] - mu[None]
  md = np.einsum("ncd,de,nce->nc", diff, prec, diff)
  md0 = np.einsum("nd,de,ne->n", x - mu0, prec0, x - mu0)
  s, det, state = run("rmds", ctx, test)
  close(s, np.max(-(md - md0[:, None]), axis=1), 1e-3)
  np.testing.assert_array_equal(det.predict(ctx, state, test), md.argmin(1))
  assert np.abs(md0).min() > 1e-3                # the background term is really there


# ------------------------------------------------------------------ NNGuide


def _numpy_nnguide(train, test, k):
  def unit(x):
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  bank = unit(train.feats) * logsumexp(train.logits.astype(np.float64), axis=1)[:, None]
  sims = unit(test.feats) @ bank.T
  guidance = np.sort(sims, axis=1)[:, ::-1][:, :k].mean(1)
  return logsumexp(test.logits.astype(np.float64), axis=1) * guidance


def test_nnguide(cnn):
  ctx, test, _, _ = cnn
  for k in [1, 5, 20]:
    close(run("nnguide", ctx, test, K=k)[0], _numpy_nnguide(ctx.train, test, k))
  # blocked search: tiny blocks give the same
  from grood_jax.detectors.nnguide import topk_inner_products
  rng = np.random.default_rng(1)
  q, bank = rng.normal(size=(13, 5)), rng.normal(size=(37, 5))
  ref = np.sort(q @ bank.T, axis=1)[:, ::-1][:, :6]
  close(topk_inner_products(q, bank, 6, query_block=4, bank_block=5), ref, 1e-5)
  # a bank subset: a seeded random max(K, round(f N)) rows
  s, det, state = run("nnguide", ctx, test, K=5, bank_fraction=0.25)
  assert len(state["bank_NxD"]) == 16
  with pytest.raises(DetectorError):
    make_detector("nnguide", K=65).check_data(num_train=64, num_classes=C, feature_dim=D)


# ------------------------------------------------------------------ Entropy, temperature


def test_entropy(cnn):
  ctx, test, _, _ = cnn
  p = softmax(test.logits.astype(np.float64), axis=1)
  close(run("entropy", ctx, test)[0], np.sum(p * np.log(p), axis=1))


def test_tempscale(cnn):
  ctx, test, _, _ = cnn
  f = test.logits.astype(np.float64)
  for t in [0.5, 1.5, 10.0]:
    close(run("tempscale", ctx, test, T=t)[0], softmax(f / t, axis=1).max(1))
  # T fitted by NLL: against a fine grid search of the float64 NLL
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(400, 6)) * 4.0
  labels = np.where(rng.uniform(size=400) < 0.6, logits.argmax(1), rng.integers(0, 6, 400))
  grid = np.exp(np.linspace(np.log(0.05), np.log(50), 20001))
  t_ref = grid[np.argmin([nll(logits, labels, t) for t in grid[::10]]) * 10]
  t_fit = fit_temperature(logits, labels)
  assert abs(np.log(t_fit) - np.log(t_ref)) < 2e-3 and t_fit > 1.2    # over-confident logits
  assert nll(logits, labels, t_fit) <= nll(logits, labels, t_ref) + 1e-9
  with pytest.raises(DetectorError):                 # no ID validation split in the context
    run("tempscale", ctx, test, T="nll")
  ctx_val = Context(**{**ctx.__dict__, "cache": {}})
  ctx_val.id_val = Split("id_val", test.feats, test.logits, labels=test.labels)
  s, _, state = run("tempscale", ctx_val, test, T="nll")
  t = fit_temperature(test.logits, test.labels)
  close(state["T"], t, 1e-6)
  close(s, softmax(f / t, axis=1).max(1))


# ------------------------------------------------------------------ Fold


def _numpy_kappa(h, w, b, alpha):
  h = h.astype(np.float64)
  z = h / np.linalg.norm(h, axis=1, keepdims=True) ** alpha
  p = softmax(z @ w.T + b, axis=1)
  return (p * (w ** 2).sum(1)).sum(1) - ((p @ w) ** 2).sum(1), z, p


def _numpy_fold(h, w, b, alpha, norm):
  """The authors' score: -tr W^T (diag p - p p^T) W, over ||sum_c p_c w_c||^2 or ||z||^2."""
  kappa, z, p = _numpy_kappa(h, w, b, alpha)
  div = {"none": np.ones(len(z)), "weight": ((p @ w) ** 2).sum(1), "feature": (z ** 2).sum(1)}
  return -kappa / np.maximum(div[norm], 1e-7)


def test_fold_exact_trace_against_the_closed_form(cnn):
  ctx, test, w, b = cnn
  assert make_detector("fold").params["alpha"] == 0.1             # the authors' fold.yml
  assert make_detector("fold").params["norm"] == "weight"
  for alpha in [0.0, 0.5, 1.0]:
    kappa, _, _ = _numpy_kappa(test.feats, w, b, alpha)
    assert kappa.min() >= 0 and np.ptp(kappa) > 1e-4 * kappa.max()
    for norm in ["none", "weight", "feature"]:
      ref = _numpy_fold(test.feats, w, b, alpha, norm)
      close(run("fold", ctx, test, alpha=alpha, norm=norm, method="exact")[0], ref, 1e-4)
      close(run("fold", ctx, test, alpha=alpha, norm=norm)[0], ref, 1e-4)   # auto: D <= 512
  # the normalisation changes the ranking, not only the scale
  a, b2 = _numpy_fold(test.feats, w, b, 0.5, "none"), _numpy_fold(test.feats, w, b, 0.5, "weight")
  assert (np.argsort(a) != np.argsort(b2)).any()


def test_fold_hutchinson_against_float64_with_the_same_probes(cnn):
  ctx, test, w, b = cnn
  kappa, _, p = _numpy_kappa(test.feats, w, b, 0.5)
  for probes, seed in [(4, 0), (16, 3)]:
    v = rademacher_probes(seed, probes, D).astype(np.float64)
    assert set(np.unique(v)) == {-1.0, 1.0}
    wv = v @ w.T                                         # (P, C): W v per probe
    # v^T W^T (diag p - p p^T) W v, averaged over probes
    est = (np.einsum("nc,pc->np", p, wv ** 2) - np.einsum("nc,pc->np", p, wv) ** 2).mean(1)
    s = run("fold", ctx, test, alpha=0.5, norm="none", method="hutchinson", probes=probes,
            seed=seed)[0]
    close(s, -est, 1e-4)
    s = run("fold", ctx, test, alpha=0.5, method="hutchinson", probes=probes, seed=seed)[0]
    close(s, -est / ((p @ w) ** 2).sum(1), 1e-4)
  # many probes: an unbiased estimate of the exact trace
  s = run("fold", ctx, test, alpha=0.5, norm="none", method="hutchinson", probes=4096)[0]
  close(s, -kappa, 0.1)


# ------------------------------------------------------------------ AutoFold


def _numpy_autofold(h, y, w, b, norm, classes):
  """Brute force: for every alpha in 0.01..1.00 and every held-out class k, class k's column
  is deleted from the head (= its logit masked to -inf), Fold recomputed in float64 and the
  AUROC (sklearn) of the other classes' samples vs class k's taken; first best mean wins."""
  from sklearn.metrics import roc_auc_score
  h = h.astype(np.float64)
  alphas = [i / 100 for i in range(1, 101)]
  curve = []
  for alpha in alphas:
    z = h / np.linalg.norm(h, axis=1, keepdims=True) ** alpha
    aucs = []
    for k in classes:
      keep = np.arange(len(b)) != k
      wk, bk = w[keep], b[keep]
      p = softmax(z @ wk.T + bk, axis=1)
      kappa = (p * (wk ** 2).sum(1)).sum(1) - ((p @ wk) ** 2).sum(1)
      div = {"none": 1.0, "weight": ((p @ wk) ** 2).sum(1), "feature": (z ** 2).sum(1)}[norm]
      aucs.append(roc_auc_score((y != k).astype(int), -kappa / div))
    curve.append(np.mean(aucs))
  curve = np.array(curve)
  return alphas[int(np.argmax(curve))], curve


def _autofold_data(w, b, n=120, seed=1):
  """ID-like features: class clusters with widely varying norms, labelled by the head's
  prediction (as a trained network's ID samples mostly are)."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(C, D)) * 2
  h = (mu[rng.integers(0, C, n)] + rng.normal(size=(n, D))) * np.exp(rng.normal(size=(n, 1)) * 0.8)
  y = np.argmax(h @ w.T + b, axis=1).astype(np.int32)
  assert len(np.unique(y)) == C
  return h.astype(np.float32), y


def test_autofold_alpha_is_the_brute_force_choice(cnn):
  import copy
  ctx, test, w, b = cnn
  h, y = _autofold_data(w, b)
  ctx_val = copy.copy(ctx)
  ctx_val.id_val = Split("id_val", h, h @ w.T.astype(np.float32) + b.astype(np.float32),
                         labels=y)
  for norm in ["weight", "none", "feature"]:
    alpha, curve = _numpy_autofold(h, y, w, b, norm, range(C))
    s, det, state = run("autofold", ctx_val, test, norm=norm)
    close(state["calib_auroc_A"], curve, 1e-6)
    assert float(state["alpha"]) == pytest.approx(alpha, abs=1e-6), norm
    if norm != "feature":
      assert 0.05 < alpha < 0.95 and np.ptp(curve) > 0.02     # an interior, clear maximum
    # scoring: Fold at the calibrated alpha
    close(s, _numpy_fold(test.feats, w, b, alpha, norm), 1e-4)
  # more classes than max_classes: a RandomState(42) draw among classes with >= 3 samples
  alpha, curve = _numpy_autofold(h, y, w, b, "weight",
                                 np.unique(y)[np.random.RandomState(42).choice(C, 2,
                                                                               replace=False)])
  _, _, state = run("autofold", ctx_val, test, max_classes=2)
  assert float(state["alpha"]) == pytest.approx(alpha, abs=1e-6)
  close(state["calib_auroc_A"], curve, 1e-6)


def test_autofold_calibration_split(cnn):
  ctx, test, w, b = cnn
  tr = ctx.train
  # no id_val on this Context: "auto" falls back to the labelled train split
  assert getattr(ctx, "id_val", None) is None
  alpha, _ = _numpy_autofold(tr.feats, tr.labels, w, b, "weight", np.unique(tr.labels))
  _, _, state = run("autofold", ctx, test)
  assert float(state["alpha"]) == pytest.approx(alpha, abs=1e-6)
  # calib_max: a seeded subset of the samples
  keep = np.sort(np.random.default_rng(42).choice(len(tr.feats), 40, replace=False))
  alpha, _ = _numpy_autofold(tr.feats[keep], tr.labels[keep], w, b, "weight",
                             np.unique(tr.labels[keep]))
  _, _, state = run("autofold", ctx, test, calib_max=40)
  assert float(state["alpha"]) == pytest.approx(alpha, abs=1e-6)
  with pytest.raises(DetectorError, match="id_val"):
    make_detector("autofold", calib="id_val").fit(ctx)


# ------------------------------------------------------------------ AdaSCALE


def _numpy_adascale(ctx, splits, variant="a", p_lo=75.0, p_hi=85.0, k1=50.0, k2=25.0,
                    lmbda=10.0, o=0.05, step=0.5):
  """Per-sample loop: jax.grad of one image's max logit, the rest in numpy float64."""
  fns, params = ctx.fns, ctx.params
  grad_one = jax.jit(jax.grad(lambda x: jnp.max(fns.logits(params, x)[0])))
  feats_one = jax.jit(lambda x: fns.forward(params, x)[1][0])
  w, b = (np.asarray(a, np.float64) for a in _affine(ctx))

  def q_stat(split):
    x = normalize(split.images, MEAN, STD)
    hs, qs = [], []
    for i in range(len(x)):
      xi = x[i:i + 1]
      g = np.asarray(grad_one(xi), np.float64).ravel()
      n_mask = max(1, int(g.size * o))
      mask = np.zeros(g.size)
      mask[np.argsort(np.abs(g), kind="stable")[:n_mask]] = 1.0
      x_pert = xi + (step * np.sign(g) * mask).reshape(xi.shape).astype(np.float32)
      h = np.asarray(feats_one(xi), np.float64)
      hp = np.asarray(feats_one(x_pert), np.float64)
      order = np.argsort(-h, kind="stable")
      n1, n2 = max(1, int(D * k1 / 100)), max(1, int(D * k2 / 100))
      qs.append(np.maximum(hp[order[:n1]], 0).sum() + lmbda * np.abs(h - hp)[order[:n2]].sum())
      hs.append(h)
    return np.array(hs), np.array(qs)

  _, q_fit = q_stat(splits[0])
  h, q = q_stat(splits[1])
  ecdf = np.array([np.mean(q_fit <= v) for v in q])
  pct = p_lo + (1 - ecdf) * (p_hi - p_lo)
  keep = np.maximum(1, D - np.round(D * pct / 100)).astype(int)
  r = np.maximum(h, 0)
  s = r.sum(1) / np.array([np.sort(ri)[::-1][:k].sum() for ri, k in zip(r, keep)])
  if variant == "a":
    return logsumexp((h * np.exp(s)[:, None]) @ w.T + b, axis=1), q
  return logsumexp((h @ w.T + b) * (s ** 2)[:, None], axis=1), q


def _affine(ctx):
  from grood_jax.detectors import common
  return common.head_affine(ctx)


def test_adascale_against_a_per_sample_loop(cnn):
  ctx, test, _, _ = cnn
  kw = dict(k1=50.0, k2=25.0, p_lo=60.0, p_hi=90.0)
  for variant in ["a", "l"]:
    ref, q_ref = _numpy_adascale(ctx, [ctx.train, test], variant=variant, **kw)
    s, det, state = run("adascale", ctx, test, variant=variant, **kw)
    assert len(state["ecdf_M"]) == len(ctx.train)
    close(s, ref, 1e-4)
  assert np.ptp(q_ref) > 0 and len(np.unique(np.round(q_ref, 4))) > 10   # Q varies per sample
  with pytest.raises(DetectorError):
    run("adascale", ctx, test, p_lo=90.0, p_hi=80.0)
  s, _, state = run("adascale", ctx, test, num_samples=20)
  assert len(state["ecdf_M"]) == 20
