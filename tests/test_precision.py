"""Precision points of issue 16, each against a float64 / sklearn reference on data where the
float32 computation of the earlier code is visibly off: ViM's second moment, kNN near-ties,
GEN's default M for C > 10."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp, softmax
from sklearn.neighbors import NearestNeighbors

from grood_jax import ops, parallel
from grood_jax.detectors import Context, Split, detector_class, make_detector
from grood_jax.modelfns import ModelFns


class LinearHead(nnx.Module):
  """A model that is only its head f = W h + b (features are given to the detectors)."""

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
    return self.head(x.reshape(x.shape[0], -1))


def feature_context(h_train, w, b, labels=None):
  fns = ModelFns(LinearHead(w, b))
  h_train = h_train.astype(np.float32)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(fns.head(fns.params, jnp.asarray(h_train)))
  return Context(fns=fns, params=fns.params, mean=0.0, std=1.0,
                 train=Split("train", h_train, logits, labels=labels))


def feature_split(fns, params, h, name="test"):
  h = h.astype(np.float32)
  with jax.default_matmul_precision("highest"):
    return Split(name, h, np.asarray(fns.head(params, jnp.asarray(h))))


# ------------------------------------------------------------------ ViM


def _vim_float64(h_train, h_test, w, b, p):
  """The authors' formulas in float64 (on the float32 inputs the detector sees)."""
  h = h_train.astype(np.float64)
  w, b = w.astype(np.float64), b.astype(np.float64)
  u = -np.linalg.pinv(w) @ b
  lam, vec = np.linalg.eigh((h - u).T @ (h - u) / len(h))
  ns = vec[:, np.argsort(-lam)[p:]]
  alpha = (h @ w.T + b).max(1).mean() / np.linalg.norm((h - u) @ ns, axis=1).mean()
  hs = h_test.astype(np.float64)
  return (logsumexp(hs @ w.T + b, axis=1) - alpha * np.linalg.norm((hs - u) @ ns, axis=1),
          np.linalg.norm((hs - u) @ ns, axis=1))


def test_vim_second_moment_in_float64_on_ill_conditioned_features():
  rng = np.random.default_rng(0)
  n, d, c = 2000, 32, 5
  basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
  spread = np.logspace(1, -3, d)                      # singular values over 4 decades
  def feats(m):
    return ((rng.normal(size=(m, d)) * spread) @ basis.T + 50.0).astype(np.float32)  # offset
  h_train, h_test = feats(n), feats(300)
  w = (rng.normal(size=(c, d)) * 0.1).astype(np.float32)
  b = rng.normal(size=c).astype(np.float32)
  ctx = feature_context(h_train, w, b)
  test = feature_split(ctx.fns, ctx.params, h_test)
  det = make_detector("vim", dim=d // 2)
  state = det.fit(ctx)
  got = det.score(ctx, state, test)
  ref, resid = _vim_float64(h_train, h_test, w, b, d // 2)
  # the residual term is what the float32 moment got wrong (5.8 % max relative error there)
  got_resid = (np.asarray(ops.energy_score(test.logits), np.float64) - got) / state["alpha"]
  np.testing.assert_allclose(got_resid, resid, rtol=5e-4, atol=5e-4 * resid.mean())
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ------------------------------------------------------------------ kNN near-ties


def _near_tie_data():
  """Six bank rows at squared distances ~0.03 from each query, 1e-4 apart, on a common offset of
  100 per coordinate: the float32 expansion ||q||^2 - 2 q.b + ||b||^2 (||q||^2 ~ 2e5) is off
  by ~1e-2, far more than the gaps."""
  rng = np.random.default_rng(5)
  d, q_n, per_q = 16, 20, 6
  centre = 100.0 + rng.normal(size=(q_n, d))
  queries, bank = [], []
  for i in range(q_n):
    dirs = rng.normal(size=(per_q, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radii = np.sqrt(0.03 + 1e-4 * rng.permutation(per_q))
    queries.append(centre[i])
    bank.append(centre[i] + dirs * radii[:, None])
  bank = np.concatenate(bank + [100.0 + 3.0 * rng.normal(size=(200, d))])
  bank = bank[rng.permutation(len(bank))]
  return np.asarray(queries, np.float32), bank.astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_knn_search_near_ties_against_sklearn(k):
  q, bank = _near_tie_data()
  dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(
      bank.astype(np.float64)).kneighbors(q.astype(np.float64))
  for kw in [dict(), dict(query_block=7, bank_block=64)]:
    d, i = ops.knn_search(q, bank, k, **kw)
    np.testing.assert_array_equal(i, idx)
    np.testing.assert_allclose(d, dist ** 2, rtol=1e-6, atol=1e-6)
  # the sharded search re-ranks the same way (a one-device mesh here; 4 in test_sharding)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  d2, i2 = ops.sharded_knn_search(q, bank, k, mesh, query_block=8, bank_block=64)
  np.testing.assert_array_equal(i2, idx)
  np.testing.assert_allclose(d2, dist ** 2, rtol=1e-6, atol=1e-6)


def test_knn_search_expansion_alone_is_what_gets_near_ties_wrong():
  """The same data without the re-rank (exact=False): the order differs from sklearn's, so the
  test above does test the re-rank."""
  q, bank = _near_tie_data()
  _, idx = NearestNeighbors(n_neighbors=10, algorithm="brute").fit(
      bank.astype(np.float64)).kneighbors(q.astype(np.float64))
  _, i = ops.knn_search(q, bank, 10, exact=False)
  assert np.mean(i != idx) > 0.1


# ------------------------------------------------------------------ GEN default M


def test_gen_default_m_follows_the_authors_for_more_than_10_classes():
  rng = np.random.default_rng(7)
  c = 20
  logits = (rng.normal(size=(50, c)) * rng.uniform(0.5, 4.0, (50, 1))).astype(np.float32)
  split = Split("s", rng.normal(size=(50, 4)).astype(np.float32), logits)
  det = make_detector("gen")
  got = det.score(None, det.fit(None), split)
  p = softmax(logits.astype(np.float64), axis=1)               # M = min(100, C) = 20: all
  np.testing.assert_allclose(got, -np.sum(p ** 0.1 * (1 - p) ** 0.1, axis=1), rtol=1e-5)
  # ImageNet-like C = 1000: the 100 largest probabilities
  logits = rng.normal(size=(8, 1000)).astype(np.float32) * 3
  got = det.score(None, {}, Split("s", np.zeros((8, 4), np.float32), logits))
  top = np.sort(softmax(logits.astype(np.float64), axis=1), axis=1)[:, ::-1][:, :100]
  np.testing.assert_allclose(got, -np.sum(top ** 0.1 * (1 - top) ** 0.1, axis=1), rtol=1e-5)
  desc = detector_class("gen").description
  assert "100" in desc and "CIFAR-10" in desc and "ImageNet" in desc
