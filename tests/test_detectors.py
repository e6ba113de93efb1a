"""The baseline detectors against independent numpy / sklearn computations of their formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp, softmax
from sklearn.neighbors import NearestNeighbors

from grood_jax.features import normalize
from grood_jax.detectors import (detector_names, Context, DetectorError, Split, make_detector)
from grood_jax.detectors import common as _common
from grood_jax.ops import knn_search
from grood_jax.features import extract
from grood_jax.modelfns import ModelFns
from grood_jax.models.cnn import SmallCNN

BASELINES = ["msp", "maxlogit", "energy", "odin", "mahalanobis", "knn", "vim", "react", "ash",
             "gradnorm", "she", "gen", "fdbd"]
C, D = 4, 8
MEAN, STD = 0.3, 0.4


@pytest.fixture(autouse=True)
def _full_precision():
  """References are float64: keep accelerators off TF32 / bf16 matmuls in these tests."""
  with jax.default_matmul_precision("highest"):
    yield


def close(a, b, rtol=1e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1e-6, float(np.abs(b).max())))


# ------------------------------------------------------------------ a tiny real backbone


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
  # make some train predictions correct so that SHE has class patterns to average
  train.labels[:32] = train.logits[:32].argmax(1)
  test = split("test", te_img)
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


def test_registry_and_unknown_parameter():
  for name in BASELINES:
    assert name in detector_names()
    det = make_detector(name)
    assert set(det.grid) <= set(det.defaults)
    assert det.grid_points()
  with pytest.raises(DetectorError):
    make_detector("knn", K=3)
  with pytest.raises(DetectorError):
    make_detector("msp", T=2.0)


def test_head_affine(cnn):
  ctx, _, w, b = cnn
  w_, b_ = _common.head_affine(ctx)
  close(w_, w, 1e-6)
  close(b_, b, 1e-6)


def test_logit_scores(cnn):
  ctx, test, _, _ = cnn
  f = test.logits.astype(np.float64)
  p = softmax(f, axis=1)
  close(run("msp", ctx, test)[0], p.max(1))
  close(run("maxlogit", ctx, test)[0], f.max(1))
  close(run("energy", ctx, test)[0], logsumexp(f, axis=1))
  close(run("energy", ctx, test, T=2.0)[0], 2.0 * logsumexp(f / 2.0, axis=1))
  for gamma, m, mm in [(0.1, 10, C), (0.5, "half", C // 2), (1.0, 3, 3)]:
    top = np.sort(p, axis=1)[:, ::-1][:, :mm]
    close(run("gen", ctx, test, gamma=gamma, M=m)[0],
          -np.sum(top ** gamma * (1 - top) ** gamma, axis=1))


def test_odin_matches_per_sample_loop(cnn):
  ctx, test, _, _ = cnn
  fns, params = ctx.fns, ctx.params

  @jax.jit
  def one(x_1xHxWxC, temperature, eps):
    def nll(x):
      f = fns.logits(params, x)[0] / temperature
      return -jax.nn.log_softmax(f)[jnp.argmax(f)]
    g = jax.grad(nll)(x_1xHxWxC)
    x2 = x_1xHxWxC - eps / STD * jnp.sign(g)
    return jnp.max(jax.nn.softmax(fns.logits(params, x2)[0] / temperature))

  x = normalize(test.images, MEAN, STD)
  for temperature, eps in [(1000.0, 0.0014), (10.0, 0.0028), (1.0, 0.05)]:
    ref = np.array([one(x[i:i + 1], temperature, eps) for i in range(len(x))])
    got = run("odin", ctx, test, T=temperature, eps=eps)[0]
    # compare the part above the uniform floor 1/C, which is all the signal at large T
    close(got - 1.0 / C, ref - 1.0 / C, 1e-3)
  # the perturbation raises the tempered confidence of the predicted class
  assert np.mean(run("odin", ctx, test, T=1.0, eps=0.05)[0] > softmax(test.logits, 1).max(1)) > .9
  for temperature in [1.0, 1000.0]:
    got = run("odin", ctx, test, T=temperature, eps=0.0)[0]
    close(got - 1.0 / C, softmax(test.logits.astype(np.float64) / temperature, 1).max(1) - 1 / C,
          1e-3)


def test_odin_shares_the_gradient_sign_across_eps(cnn, monkeypatch):
  """The grid's eps values of one T share one gradient pass (signs kept per split); scores
  equal the fused forward-backward-forward path (sign_cache_mib=0), and eps = 0 runs no model."""
  from grood_jax.detectors import odin as odin_mod
  ctx, test, _, _ = cnn
  fused = {eps: run("odin", ctx, test, T=10.0, eps=eps, sign_cache_mib=0)[0]
           for eps in (0.0014, 0.0028)}
  calls = {"sign": 0, "step": 0}
  real_sign, real_step = odin_mod.make_sign_fn, odin_mod.make_step_fn

  def wrap(make, name):
    def made(fns):
      fn = make(fns)
      def counted(*a):
        calls[name] += 1
        return fn(*a)
      return counted
    return made

  monkeypatch.setattr(odin_mod, "make_sign_fn", wrap(real_sign, "sign"))
  monkeypatch.setattr(odin_mod, "make_step_fn", wrap(real_step, "step"))
  ctx2 = dataclasses.replace(ctx, cache={})
  n_batches = -(-len(test) // ctx2.batch_size)
  for eps in (0.0014, 0.0028):
    got = run("odin", ctx2, test, T=10.0, eps=eps)[0]
    np.testing.assert_allclose(got, fused[eps], rtol=1e-5, atol=1e-6)
  assert calls == {"sign": n_batches, "step": 2 * n_batches}
  no_images = dataclasses.replace(test, images=None)
  close(run("odin", ctx2, no_images, T=10.0, eps=0.0)[0],
        softmax(test.logits.astype(np.float64) / 10.0, 1).max(1), 1e-5)


def test_mahalanobis(cnn):
  ctx, test, _, _ = cnn
  h, y = ctx.train.feats.astype(np.float64), ctx.train.labels
  mu = np.stack([h[y == c].mean(0) for c in range(C)])
  cen = h - mu[y]
  prec = np.linalg.pinv(cen.T @ cen / len(h))
  diff = test.feats[:, None, :] - mu[None]                       # (N, C, D)
  maha = np.einsum("ncd,de,nce->nc", diff, prec, diff)
  s, det, state = run("mahalanobis", ctx, test)
  close(s, -maha.min(1))
  np.testing.assert_array_equal(det.predict(ctx, state, test), maha.argmin(1))


def test_knn(cnn):
  ctx, test, _, _ = cnn
  bank = ctx.train.feats / np.linalg.norm(ctx.train.feats, axis=1, keepdims=True)
  q = test.feats / np.linalg.norm(test.feats, axis=1, keepdims=True)
  for k in [1, 5, 50]:
    dist, _ = NearestNeighbors(n_neighbors=k).fit(bank.astype(np.float64)).kneighbors(q)
    close(run("knn", ctx, test, k=k, query_block=7, bank_block=20)[0], -dist[:, -1], 1e-3)
  with pytest.raises(DetectorError):
    run("knn", ctx, test, k=65)


def test_knn_grid_points_share_the_search(cnn, monkeypatch):
  """Grid points that differ only in k search each (bank, split) twice in all (the first k,
  then the grid's largest) and give the scores of a fresh search per point (the exact re-rank's
  sums round by the candidate count: 1 ulp, 1e-7 relative)."""
  from grood_jax import ops
  ctx, test, _, _ = cnn
  fresh = {k: run("knn", dataclasses.replace(ctx, cache={}), test, k=k)[0] for k in (1, 5, 10, 50)}
  calls = []
  real = ops.knn_search
  monkeypatch.setattr(ops, "knn_search",
                      lambda q, b, k, **kw: calls.append(k) or real(q, b, k, **kw))
  shared = dataclasses.replace(ctx, cache={})
  for k in (1, 5, 10, 50, 5):
    np.testing.assert_allclose(run("knn", shared, test, k=k)[0], fresh[k], rtol=1e-6, atol=0)
  assert calls == [1, len(ctx.train.feats)]   # the grid's largest k (200) capped at the bank
  other = dataclasses.replace(test, feats=test.feats.copy())   # another split: its own search
  np.testing.assert_allclose(run("knn", shared, other, k=5)[0], fresh[5], rtol=1e-6, atol=0)
  assert calls[-1] == 5


def _numpy_vim(ctx, split, w, b, p):
  h = ctx.train.feats.astype(np.float64)
  u = -np.linalg.pinv(w) @ b
  lam, vec = np.linalg.eigh((h - u).T @ (h - u) / len(h))
  ns = vec[:, np.argsort(-lam)[p:]]
  alpha = (h @ w.T + b).max(1).mean() / np.linalg.norm((h - u) @ ns, axis=1).mean()
  hs = split.feats.astype(np.float64)
  return logsumexp(hs @ w.T + b, axis=1) - alpha * np.linalg.norm((hs - u) @ ns, axis=1)


def test_vim(cnn):
  ctx, test, w, b = cnn
  close(run("vim", ctx, test)[0], _numpy_vim(ctx, test, w, b, D // 2), 1e-3)
  close(run("vim", ctx, test, dim=0.75)[0], _numpy_vim(ctx, test, w, b, 6), 1e-3)
  close(run("vim", ctx, test, dim=2)[0], _numpy_vim(ctx, test, w, b, 2), 1e-3)
  with pytest.raises(DetectorError):
    run("vim", ctx, test, dim=D)


def test_react(cnn):
  ctx, test, w, b = cnn
  for pct in [90.0, 99.0]:
    c = np.percentile(ctx.train.feats.ravel(), pct)
    ref = logsumexp(np.minimum(test.feats.astype(np.float64), c) @ w.T + b, axis=1)
    close(run("react", ctx, test, percentile=pct)[0], ref)


def _numpy_ash(h, pct, variant):
  h = h.astype(np.float64)
  k = max(1, h.shape[1] - int(np.round(h.shape[1] * pct / 100.0)))
  out = np.zeros_like(h)
  for i, row in enumerate(h):                          # a loop over samples: test only
    keep = np.argsort(-row, kind="stable")[:k]
    if variant == "p":
      out[i, keep] = row[keep]
    elif variant == "b":
      out[i, keep] = row.sum() / k
    else:
      out[i, keep] = row[keep] * np.exp(row.sum() / row[keep].sum())
  return out


def test_ash(cnn):
  ctx, test, w, b = cnn
  for variant in ["s", "b", "p"]:
    for pct in [65.0, 90.0]:
      ref = logsumexp(_numpy_ash(test.feats, pct, variant) @ w.T + b, axis=1)
      close(run("ash", ctx, test, percentile=pct, variant=variant)[0], ref)
  with pytest.raises(DetectorError):
    run("ash", ctx, test, variant="x")


def test_gradnorm_is_l1_norm_of_the_weight_gradient(cnn):
  ctx, test, w, b = cnn
  kernel = jnp.asarray(w.T, jnp.float32)                  # flax layout (D, C)
  bias = jnp.asarray(b, jnp.float32)
  h = jnp.asarray(test.feats)
  close(ctx.fns.head(ctx.params, h), h @ kernel + bias, 1e-5)

  def kl_uniform(kernel_DxC, h_D):
    logp = jax.nn.log_softmax(h_D @ kernel_DxC + bias)
    return jnp.sum((1.0 / C) * (jnp.log(1.0 / C) - logp))

  grads_NxDxC = jax.vmap(jax.grad(kl_uniform), in_axes=(None, 0))(kernel, h)
  ref = np.abs(np.asarray(grads_NxDxC, np.float64)).sum(axis=(1, 2))
  close(run("gradnorm", ctx, test)[0], ref)


def test_she(cnn):
  ctx, test, _, _ = cnn
  h, y = ctx.train.feats.astype(np.float64), ctx.train.labels
  ok = ctx.train.logits.argmax(1) == y
  m = np.stack([h[ok & (y == c)].mean(0) if np.any(ok & (y == c)) else np.zeros(D)
                for c in range(C)])
  pred = test.logits.argmax(1)
  close(run("she", ctx, test)[0], np.sum(test.feats * m[pred], axis=1))


def test_fdbd(cnn):
  ctx, test, w, b = cnn
  f = test.logits.astype(np.float64)
  pred = f.argmax(1)
  num = np.zeros(len(f))
  for j in range(C):
    wn = np.linalg.norm(w[pred] - w[j], axis=1)
    gap = f[np.arange(len(f)), pred] - f[:, j]
    num += np.where(pred == j, 0.0, gap / np.where(wn > 0, wn, 1))
  num /= C - 1
  mu = ctx.train.feats.astype(np.float64).mean(0)
  close(run("fdbd", ctx, test)[0], num / np.linalg.norm(test.feats - mu, axis=1))
  close(run("fdbd", ctx, test, normalizer="norm")[0], num / np.linalg.norm(test.feats, axis=1))


# ------------------------------------------------------------------ exact blocked search


def _brute(q, bank, k):
  d = ((q[:, None, :].astype(np.int64) - bank[None].astype(np.int64)) ** 2).sum(-1)
  idx = np.argsort(d, axis=1, kind="stable")[:, :k]       # ties: lowest index first
  return np.take_along_axis(d, idx, 1), idx


def test_knn_search_exact_with_ties_and_tiny_blocks():
  rng = np.random.default_rng(1)
  bank = rng.integers(0, 3, (23, 4))
  bank[:, 0] = np.maximum(bank[:, 0], 1)                   # no zero bank row ...
  bank[[5, 11, 17, 22]] = bank[2]                          # duplicated rows across blocks
  q = rng.integers(0, 3, (11, 4))
  q[0] = 0                                                 # ... so zero padding rows would win
  q[1] = bank[2]
  for k, qb, bb in [(7, 3, 5), (1, 3, 5), (23, 4, 6), (5, 1024, 16384), (3, 11, 23)]:
    d_ref, i_ref = _brute(q, bank, k)
    d, i = knn_search(q.astype(np.float32), bank.astype(np.float32), k, query_block=qb,
                      bank_block=bb)
    assert d.shape == (len(q), k) and i.shape == (len(q), k)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref.astype(np.float32))
  np.testing.assert_array_equal(knn_search(q, bank, 4, bank_block=5)[1][1], [2, 5, 11, 17])
  for bad in [0, 24]:
    with pytest.raises(DetectorError):
      knn_search(q, bank, bad)
  d, i = knn_search(np.zeros((0, 4)), bank, 2)
  assert d.shape == (0, 2) and i.shape == (0, 2)


def test_knn_search_float_against_sklearn():
  rng = np.random.default_rng(2)
  bank = rng.normal(size=(200, 16)).astype(np.float32)
  q = rng.normal(size=(37, 16)).astype(np.float32)
  d, i = knn_search(q, bank, 10, query_block=8, bank_block=64)
  dist, idx = NearestNeighbors(n_neighbors=10).fit(bank.astype(np.float64)).kneighbors(q)
  np.testing.assert_array_equal(i, idx)
  close(d, dist ** 2, 1e-4)


# ------------------------------------------------------------------ sign convention


class ToyNet(nnx.Module):
  """Images (B, 1, 1, D) whose pixels are the features; a linear head on them."""

  def __init__(self, w_CxD, b_C):
    self.num_classes, self.feature_dim, self.in_channels = w_CxD.shape[0], w_CxD.shape[1], 1
    self.fc = nnx.Linear(w_CxD.shape[1], w_CxD.shape[0], rngs=nnx.Rngs(0))
    self.fc.kernel[...] = jnp.asarray(w_CxD.T, jnp.float32)
    self.fc.bias[...] = jnp.asarray(b_C, jnp.float32)

  def early(self, x):
    return x.reshape(x.shape[0], -1)

  def from_early(self, e):
    return e

  def head(self, h):
    return self.fc(h)

  def __call__(self, x):
    return self.head(self.from_early(self.early(x)))


def _auroc(id_s, ood_s):
  id_s, ood_s = np.asarray(id_s, np.float64), np.asarray(ood_s, np.float64)
  return float(np.mean((id_s[:, None] > ood_s[None]) + 0.5 * (id_s[:, None] == ood_s[None])))


def test_id_scores_above_obvious_ood_for_every_detector():
  rng = np.random.default_rng(3)

  def blobs(n_per_class):
    y = np.repeat(np.arange(C), n_per_class)
    h = np.abs(rng.normal(0, 15, (len(y), D)))
    h[np.arange(len(y)), y] = 200 + rng.normal(0, 10, len(y))
    return np.clip(h, 0, 255).astype(np.uint8), y.astype(np.int32)

  w = np.zeros((C, D))
  w[:, :C] = 0.05 * np.eye(C)                  # class c reads feature c
  model = ToyNet(w, np.array([0.1, -0.1, 0.2, 0.0]))
  fns = ModelFns(model)
  mean, std = 0.0, 1.0 / 255.0                  # normalised image == raw pixel == feature
  tr, tr_y = blobs(60)
  te, te_y = blobs(10)
  ood = np.abs(rng.normal(0, 15, (40, D)))
  ood[:, C:] += 100                             # activity where no class looks
  ood = np.clip(ood, 0, 255).astype(np.uint8)

  def split(name, h_u8, labels=None):
    images = h_u8.reshape(-1, 1, 1, D)
    f = extract(fns, fns.params, images, mean=mean, std=std, batch_size=16)
    return Split(name, f.feats, f.logits, images=images, labels=labels)

  ctx = Context(fns=fns, params=fns.params, mean=mean, std=std, train=split("train", tr, tr_y),
                batch_size=16)
  id_test, ood_test = split("id", te, te_y), split("ood", ood)
  np.testing.assert_allclose(id_test.feats, te.astype(np.float32), rtol=1e-5)
  for name in BASELINES:
    det = make_detector(name)
    state = det.fit(ctx)
    auroc = _auroc(det.score(ctx, state, id_test), det.score(ctx, state, ood_test))
    assert auroc > 0.9, (name, auroc)
    assert np.mean(det.predict(ctx, state, id_test) == te_y) > 0.9, name
