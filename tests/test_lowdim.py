"""Low-dimensional gradient: per-sample grads, streaming stats, subspaces, probe, detectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from jax.flatten_util import ravel_pytree
from sklearn.neighbors import NearestNeighbors

from grood_jax import lowdim
from grood_jax.detectors import Context, Split, make_detector
from grood_jax.detectors import lowdim as _lowdim_detectors  # noqa: F401  (registers)
from grood_jax.models.cnn import SmallCNN
from grood_jax.modelfns import ModelFns

N_TRAIN, BS, C = 45, 16, 3           # 45 = 2 full batches + a padded one
MEAN, STD = 0.4, 0.25


@pytest.fixture(scope="module")
def tiny():
  model = SmallCNN(num_classes=C, in_channels=1, width=2, feature_dim=4, rngs=nnx.Rngs(0))
  # Non-trivial BatchNorm running statistics, so that eval mode visibly uses them.
  rng = np.random.default_rng(0)
  for bn in (model.bn1, model.bn2, model.bn3, model.bn4, model.bn5):
    bn.mean[...] = jnp.asarray(rng.normal(0, 0.3, bn.mean.shape), jnp.float32)
    bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, bn.var.shape), jnp.float32)
  fns = ModelFns(model)                      # puts the model in eval mode
  images = rng.integers(0, 256, (N_TRAIN, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, C, N_TRAIN).astype(np.int32)
  x = jnp.asarray((images.astype(np.float32) / 255 - MEAN) / STD)
  # Materialised G in batches of the same shape the streaming passes use (one compilation).
  xp = jnp.concatenate([x, jnp.repeat(x[-1:], 3 * BS - N_TRAIN, axis=0)])
  g = np.concatenate([np.asarray(lowdim.param_grads(fns, fns.params, xp[i:i + BS]))
                      for i in range(0, 3 * BS, BS)])[:N_TRAIN].astype(np.float64)
  return {"model": model, "fns": fns, "images": images, "labels": labels, "x": x, "G": g}


def _stats(t):
  return lowdim.grad_stats(t["fns"], t["fns"].params, t["images"], batch_size=BS, mean=MEAN,
                           std=STD)


def _normalised(t, stats):
  return (t["G"] - np.asarray(stats["mean_P"], np.float64)) / np.asarray(stats["scale_P"],
                                                                          np.float64)


def test_param_grads_match_a_loop(tiny):
  model, x, g = tiny["model"], tiny["x"], tiny["G"]
  assert g.shape == (N_TRAIN, lowdim.num_params(tiny["fns"].params)) == (N_TRAIN, 461)

  def y(m, xi):
    return jax.nn.logsumexp(m(xi[None])[0])

  grad_fn = nnx.jit(nnx.grad(y))
  for i in (0, 17, 44):
    grads = grad_fn(model, x[i])              # w.r.t. the nnx.Param leaves only
    ref = np.asarray(ravel_pytree(nnx.state(grads, nnx.Param))[0])
    np.testing.assert_allclose(g[i], ref, rtol=1e-4, atol=1e-6)
  # The flat order is the one of flat_params / ravel_pytree of the Param leaves.
  np.testing.assert_array_equal(np.asarray(lowdim.flat_params(tiny["fns"].params)),
                                np.asarray(ravel_pytree(nnx.state(model, nnx.Param))[0]))


def test_param_grads_in_chunks_equal_the_whole_batch(tiny):
  """param_grads(chunk=c) computes c rows per call: the same rows as one call (to float
  rounding), for a chunk that divides the batch and one that leaves a short last chunk."""
  x = tiny["x"][:BS]
  whole = np.asarray(lowdim.param_grads(tiny["fns"], tiny["fns"].params, x, chunk=None))
  np.testing.assert_allclose(whole, tiny["G"][:BS], rtol=1e-5, atol=1e-7)
  for c in (4, 5, 1):
    got = np.asarray(lowdim.param_grads(tiny["fns"], tiny["fns"].params, x, chunk=c))
    assert got.shape == whole.shape
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="chunk must be"):
    lowdim.param_grads(tiny["fns"], tiny["fns"].params, x, chunk=0)


def test_streaming_stats_match_numpy(tiny):
  stats = _stats(tiny)
  g = tiny["G"]
  assert stats["n"] == N_TRAIN
  np.testing.assert_allclose(stats["mean_P"], g.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var_P"], g.var(0), rtol=1e-3, atol=1e-8)
  std = np.sqrt(g.var(0))
  scale = np.asarray(stats["scale_P"])
  zero = std <= 1e-6 * std.max()
  assert zero.any()                                   # this tiny net has dead coordinates
  np.testing.assert_allclose(scale[zero], std.max(), rtol=1e-4)
  np.testing.assert_allclose(scale[~zero], std[~zero], rtol=1e-3)
  # The rule itself: zero variance -> the largest std; all-constant -> 1.
  np.testing.assert_allclose(lowdim.grad_scale(jnp.array([0.0, 4.0, 1.0])), [2.0, 2.0, 1.0])
  np.testing.assert_allclose(lowdim.grad_scale(jnp.zeros(3)), np.ones(3))


def test_pca_subspace_matches_svd(tiny):
  stats = _stats(tiny)
  a = _normalised(tiny, stats)
  np.testing.assert_allclose(a.mean(0), 0.0, atol=1e-3)       # centred by construction
  s = np.linalg.svd(a, compute_uv=False)
  k = 2 + int(np.argmax(s[2:6] / s[3:7]))                     # K in 2..5 with the widest gap
  assert s[k - 1] / s[k] > 1.05
  _, _, vt = np.linalg.svd(a, full_matrices=False)
  v, var = lowdim.pca_subspace(tiny["fns"], tiny["fns"].params, stats, tiny["images"], k,
                               key=jax.random.key(3), power_iters=8, oversample=10,
                               batch_size=BS, mean=MEAN, std=STD)
  v = np.asarray(v, np.float64)
  assert v.shape == (a.shape[1], k)
  np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-4)
  assert np.max(scipy.linalg.subspace_angles(v, vt[:k].T)) < 1e-3
  np.testing.assert_allclose(var, s[:k] ** 2 / N_TRAIN, rtol=1e-3)
  z = lowdim.reduce_grads(tiny["fns"], tiny["fns"].params, stats, jnp.asarray(v, jnp.float32),
                          tiny["images"], batch_size=BS, mean=MEAN, std=STD)
  np.testing.assert_allclose(z, a @ v, rtol=1e-3, atol=1e-3 * np.abs(a @ v).max())


def test_class_mean_subspace_matches_numpy(tiny):
  stats = _stats(tiny)
  a = _normalised(tiny, stats)
  labels = tiny["labels"].copy()
  labels[labels == 2] = 1                                   # class 2 empty -> zero column
  v = np.asarray(lowdim.class_mean_subspace(tiny["fns"], tiny["fns"].params, stats,
                                            tiny["images"], labels, C, batch_size=BS,
                                            mean=MEAN, std=STD))
  assert v.shape == (a.shape[1], C)
  for c in range(2):
    m = a[labels == c].mean(0)
    np.testing.assert_allclose(v[:, c], m / np.linalg.norm(m), rtol=1e-3, atol=1e-5)
  np.testing.assert_array_equal(v[:, 2], 0.0)


def test_probe_training_reduces_loss():
  rng = np.random.default_rng(1)
  n, k, c = 600, 8, 4
  y = rng.integers(0, c, n).astype(np.int32)
  z = (rng.normal(0, 1, (n, k)) + 1.5 * np.eye(c, k)[y] + 3.0).astype(np.float32)
  state, losses = lowdim.train_probe(z, y, c, seed=0, epochs=10, batch_size=64)
  assert losses.shape == (10,) and losses[-1] < 0.8 * losses[0]
  init_loss = float(jnp.log(c))
  assert float(lowdim.probe_loss(state, z, y)) < 0.8 * init_loss
  acc = (np.asarray(lowdim.probe_logits(state, z)).argmax(1) == y).mean()
  assert acc > 0.6
  state2, losses2 = lowdim.train_probe(z, y, c, seed=0, epochs=10, batch_size=64)
  np.testing.assert_array_equal(losses, losses2)                  # seeded


def _ctx(t):
  n = len(t["images"])
  train = Split("train", np.zeros((n, 4), np.float32), np.zeros((n, C), np.float32),
                t["images"], t["labels"])
  return Context(fns=t["fns"], params=t["fns"].params, mean=MEAN, std=STD, train=train, seed=0)


def test_lowdim_knn_matches_sklearn(tiny):
  ctx = _ctx(tiny)
  det = make_detector("lowdim_knn", K=4, k=3, n_fit=40, batch_size=BS, power_iters=2)
  state = det.fit(ctx)
  rng = np.random.default_rng(5)
  test = Split("test", np.zeros((10, 4), np.float32), np.zeros((10, C), np.float32),
               rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8))
  scores = det.score(ctx, state, test)
  assert scores.shape == (10,) and scores.dtype == np.float32
  stats = {"mean_P": state["mean_P"], "scale_P": state["scale_P"]}
  z = lowdim.reduce_grads(ctx.fns, ctx.params, stats, state["V_PxK"], test.images,
                          batch_size=BS, mean=MEAN, std=STD).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  bank = np.asarray(state["bank_NxK"], np.float64)
  assert bank.shape == (40, 4)
  np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-5)
  dist, _ = NearestNeighbors(n_neighbors=3).fit(bank).kneighbors(z)
  np.testing.assert_allclose(scores, -dist[:, 2], rtol=1e-3, atol=1e-4)
  # grid points differing only in k share one search of this split (the second search is at
  # the grid's largest k, capped at the bank): each still scores its own k-th neighbour
  dist, _ = NearestNeighbors(n_neighbors=40).fit(bank).kneighbors(z)
  for k in (1, 5, 2, 40):
    d_k = make_detector("lowdim_knn", K=4, k=k, n_fit=40, batch_size=BS, power_iters=2)
    np.testing.assert_allclose(d_k.score(ctx, d_k.fit(ctx), test), -dist[:, k - 1],
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("subspace", ["pca", "classmean"])
def test_detectors_fit_and_score(tiny, subspace):
  ctx = _ctx(tiny)
  kw = dict(subspace=subspace, K=4, n_fit=32, batch_size=BS, power_iters=1)
  dets = {n: make_detector(n, **kw) for n in ("lowdim_knn", "lowdim_msp", "lowdim_energy")}
  states = {n: d.fit(ctx) for n, d in dets.items()}
  # One shared fit: the same subspace object in all three states.
  assert states["lowdim_knn"]["V_PxK"] is states["lowdim_msp"]["V_PxK"]
  assert states["lowdim_msp"]["V_PxK"] is states["lowdim_energy"]["V_PxK"]
  k_dim = 4 if subspace == "pca" else C
  assert states["lowdim_knn"]["V_PxK"].shape == (461, k_dim)
  split = Split("test", np.zeros((7, 4), np.float32), np.zeros((7, C), np.float32),
                tiny["images"][:7])
  for n, d in dets.items():
    s = d.score(ctx, states[n], split)
    assert s.shape == (7,) and s.dtype == np.float32 and np.all(np.isfinite(s))
  msp = dets["lowdim_msp"].score(ctx, states["lowdim_msp"], split)
  assert np.all((msp >= 1 / C - 1e-6) & (msp <= 1 + 1e-6))
  pred = dets["lowdim_msp"].predict(ctx, states["lowdim_msp"], split)
  assert pred.shape == (7,) and set(pred.tolist()) <= set(range(C))


@pytest.mark.parametrize("subspace", ["pca", "classmean"])
def test_fit_computes_each_gradient_once_when_kept(tiny, subspace, monkeypatch):
  """grad_cache_mib keeps the fit set's gradient batches: one model pass instead of one per
  data pass (pca: stats + power_iters + 1 + reduction), and bit-identical fits and scores."""
  from grood_jax.lowdim import grads as grads_mod
  calls = {"n": 0}
  real = grads_mod.param_grads

  def counting(*a, **k):
    calls["n"] += 1
    return real(*a, **k)

  monkeypatch.setattr(grads_mod, "param_grads", counting)
  split = Split("test", np.zeros((7, 4), np.float32), np.zeros((7, C), np.float32),
                tiny["images"][:7])
  out = {}
  for mib in (0, 1):
    ctx = _ctx(tiny)
    det = make_detector("lowdim_knn", subspace=subspace, K=4, k=2, n_fit=N_TRAIN,
                        batch_size=BS, power_iters=2, grad_cache_mib=mib)
    calls["n"] = 0
    state = det.fit(ctx)
    out[mib] = (calls["n"], state, det.score(ctx, state, split))
  n_batches = 3                                        # 45 rows in batches of 16
  passes = 2 + 2 + 1 if subspace == "pca" else 3      # stats, power iters, final, reduce
  assert out[0][0] == n_batches * passes
  assert out[1][0] == n_batches
  for key in ("mean_P", "scale_P", "V_PxK", "bank_NxK"):
    np.testing.assert_array_equal(np.asarray(out[0][1][key]), np.asarray(out[1][1][key]))
  np.testing.assert_array_equal(out[0][2], out[1][2])
  # the kept batches are the ones a fresh pass computes
  gb = lowdim.GradBatches(tiny["fns"], tiny["fns"].params, tiny["images"], batch_size=BS,
                          mean=MEAN, std=STD, keep_bytes=2 ** 20)
  assert gb.keeps and gb.nbytes == 4 * 48 * 461
  first = np.concatenate([np.asarray(g)[:stop - start] for g, _, start, stop in gb])
  second = np.concatenate([np.asarray(g)[:stop - start] for g, _, start, stop in gb])
  np.testing.assert_array_equal(first, second)
  np.testing.assert_allclose(first, tiny["G"], rtol=1e-5, atol=1e-7)
