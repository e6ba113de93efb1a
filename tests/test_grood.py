"""GROOD: NCP loss gradients, prototypes, OOD sources, bank search, the detector end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grood_jax.detectors import Context, DetectorError, Split, make_detector
from grood_jax.features import extract
from grood_jax.grood import loss, ood_sources, prototypes, search
from grood_jax.modelfns import ModelFns
from grood_jax.models.cnn import SmallCNN


# -- numpy reference (float64) -------------------------------------------------------------

def np_loss(h, protos, t, tau=1.0):
  s = -np.linalg.norm(h[None] - protos, axis=-1) / tau
  m = s.max()
  return m + np.log(np.exp(s - m).sum()) - s[t]


def np_pi(h, protos, tau=1.0):
  s = -np.linalg.norm(h[None] - protos, axis=-1) / tau
  e = np.exp(s - s.max())
  return e / e.sum()


def fd_grad(h, protos, t, row, tau, eps=1e-6):
  """Central finite difference of the loss w.r.t. prototype `row`, in float64."""
  g = np.zeros(protos.shape[1])
  for j in range(protos.shape[1]):
    pp, pm = protos.copy(), protos.copy()
    pp[row, j] += eps
    pm[row, j] -= eps
    g[j] = (np_loss(h, pp, t, tau) - np_loss(h, pm, t, tau)) / (2 * eps)
  return g


def np_grood_grads(feats, class_protos, ood, tau=1.0):
  """Closed form (pi_ood / tau) (h - p_ood) / ||h - p_ood||, float64."""
  protos = np.concatenate([class_protos, ood[None]]).astype(np.float64)
  out = []
  for h in feats.astype(np.float64):
    d = h - protos[-1]
    n = np.linalg.norm(d)
    out.append(np_pi(h, protos, tau)[-1] / tau * (d / n if n > 0 else 0 * d))
  return np.array(out)


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  c, d, b = 4, 6, 7
  class_protos = rng.normal(size=(c, d)).astype(np.float32)
  ood = rng.normal(size=d).astype(np.float32) * 0.5
  feats = (rng.normal(size=(b, d)) * 1.2).astype(np.float32)
  targets = rng.integers(0, c, size=b).astype(np.int32)
  return class_protos, ood, feats, targets


# -- loss and gradients --------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_grad_ood_matches_closed_form_and_fd(problem, tau):
  class_protos, ood, feats, targets = problem
  g = np.asarray(loss.prototype_grads(feats, class_protos, ood, targets, wrt="ood", tau=tau))
  cf = np.asarray(loss.closed_form_grad_ood(feats, class_protos, ood, tau=tau))
  np.testing.assert_allclose(g, cf, atol=1e-5)
  np.testing.assert_allclose(g, np_grood_grads(feats, class_protos, ood, tau), atol=1e-5)
  protos64 = np.concatenate([class_protos, ood[None]]).astype(np.float64)
  for i in range(len(feats)):
    fd = fd_grad(feats[i].astype(np.float64), protos64, targets[i], len(protos64) - 1, tau)
    np.testing.assert_allclose(g[i], fd, atol=1e-5)
    pi_ood = np_pi(feats[i].astype(np.float64), protos64, tau)[-1]
    np.testing.assert_allclose(np.linalg.norm(g[i]), pi_ood / tau, rtol=1e-5)


def test_ncp_loss_matches_numpy(problem):
  class_protos, ood, feats, targets = problem
  protos = np.concatenate([class_protos, ood[None]])
  for tau in (1.0, 2.5):
    got = jax.vmap(loss.ncp_loss, in_axes=(0, None, 0, None))(feats, protos, targets, tau)
    want = [np_loss(h.astype(np.float64), protos.astype(np.float64), t, tau)
            for h, t in zip(feats, targets)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_grad_ood_independent_of_target(problem):
  class_protos, ood, feats, _ = problem
  grads = [np.asarray(loss.prototype_grads(feats, class_protos, ood,
                                            np.full(len(feats), t, np.int32)))
           for t in range(len(class_protos))]
  for g in grads[1:]:
    np.testing.assert_allclose(g, grads[0], atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_grad_class_matches_fd_and_closed_form(problem, tau):
  class_protos, ood, feats, targets = problem
  g = np.asarray(loss.prototype_grads(feats, class_protos, ood, targets, wrt="class", tau=tau))
  cf = np.asarray(loss.closed_form_grad_class(feats, class_protos, ood, targets, tau=tau))
  np.testing.assert_allclose(g, cf, atol=1e-5)
  protos64 = np.concatenate([class_protos, ood[None]]).astype(np.float64)
  for i in range(len(feats)):
    fd = fd_grad(feats[i].astype(np.float64), protos64, targets[i], targets[i], tau)
    np.testing.assert_allclose(g[i], fd, atol=1e-5)


def test_grads_finite_at_prototypes(problem):
  class_protos, ood, _, _ = problem
  # h == p_ood exactly, and h == a class prototype (its target and another one)
  feats = np.stack([ood, class_protos[1], class_protos[2]])
  targets = np.array([0, 1, 0], np.int32)
  for wrt in ("ood", "class"):
    g = np.asarray(loss.prototype_grads(feats, class_protos, ood, targets, wrt=wrt))
    assert np.isfinite(g).all(), wrt
  g = np.asarray(loss.prototype_grads(feats, class_protos, ood, targets, wrt="ood"))
  np.testing.assert_array_equal(g[0], 0.0)           # zero at the kink
  np.testing.assert_allclose(g, np.asarray(loss.closed_form_grad_ood(feats, class_protos, ood)),
                             atol=1e-6)
  gc = np.asarray(loss.prototype_grads(feats, class_protos, ood, targets, wrt="class"))
  np.testing.assert_array_equal(gc[1], 0.0)          # h == p_target
  assert np.isfinite(np.asarray(jax.grad(loss.safe_norm)(jnp.zeros(3)))).all()


def test_batched_grads_padding_and_methods(problem):
  class_protos, ood, feats, targets = problem
  full = np.asarray(loss.prototype_grads(feats, class_protos, ood, targets))
  for method in ("autodiff", "closed_form"):
    got = loss.batched_grads(feats, class_protos, ood, targets, method=method, batch_size=3)
    np.testing.assert_allclose(got, full, atol=1e-6)


# -- prototypes ----------------------------------------------------------------------------

def test_class_means():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(50, 5)).astype(np.float32)
  labels = rng.integers(0, 3, size=50)
  got = np.asarray(prototypes.class_means(feats, labels, 3))
  want = np.stack([feats[labels == c].mean(0) for c in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"class\(es\) \[3\]"):
    prototypes.class_means(feats, labels, 4)


# -- search --------------------------------------------------------------------------------

@pytest.mark.parametrize("k,qb,bb", [(1, 4, 3), (3, 64, 1000), (5, 1, 1)])
def test_search_matches_bruteforce_with_ties(k, qb, bb):
  rng = np.random.default_rng(2)
  bank = rng.integers(-2, 3, size=(23, 4)).astype(np.float32)   # small integers: many ties
  bank[5] = bank[17] = bank[11]                                  # exact duplicates
  queries = np.concatenate([rng.integers(-2, 3, size=(9, 4)), bank[[11, 0]]]).astype(np.float32)
  d, i = search.knn_search(queries, bank, k, query_block=qb, bank_block=bb)
  d, i = np.asarray(d), np.asarray(i)
  d_full = ((queries[:, None, :] - bank[None]) ** 2).sum(-1)
  want = np.sort(d_full, axis=1)[:, :k]
  np.testing.assert_array_equal(d, want)
  np.testing.assert_array_equal(np.take_along_axis(d_full, i, 1), d)   # indices match distances
  assert all(len(set(r)) == k for r in i)                              # no index twice
  s = search.bank_scores(queries, bank, k=k, query_block=qb, bank_block=bb)
  np.testing.assert_array_equal(s, -want[:, k - 1])


def test_search_breaks_ties_by_index():
  bank = np.zeros((7, 2), np.float32)
  _, i = search.knn_search(np.zeros((2, 2), np.float32), bank, 4, query_block=1,
                                  bank_block=3)
  np.testing.assert_array_equal(i, [[0, 1, 2, 3]] * 2)


def test_cosine_and_l1_scores():
  rng = np.random.default_rng(3)
  bank = rng.normal(size=(20, 5)).astype(np.float32)
  q = rng.normal(size=(6, 5)).astype(np.float32)
  un = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = un(q) @ un(bank).T
  want = -(1 - np.sort(cos, axis=1)[:, ::-1][:, 1])               # k = 2
  np.testing.assert_allclose(search.bank_scores(q, bank, k=2, metric="cosine"), want, atol=1e-5)
  np.testing.assert_allclose(search.gradient_scores(q, None, score_kind="l1norm"),
                             -np.abs(q).sum(1), rtol=1e-6)


# -- OOD sources ---------------------------------------------------------------------------

def test_noise_keeps_lowest_logsumexp():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(450, 3)).astype(np.float32) * 3
  lse = np.log(np.exp(logits.astype(np.float64)).sum(1))
  keep = ood_sources.noise_keep(logits, n_ood=40)                  # 4 batches of 100
  want = np.concatenate([b * 100 + np.argsort(lse[b * 100:(b + 1) * 100])[:10] for b in range(4)])
  np.testing.assert_array_equal(keep, np.sort(want))
  keep_all = ood_sources.noise_keep(logits, n_ood=1000)             # 4 full batches + 50 rows
  assert len(keep_all) == 45
  feats = rng.normal(size=(450, 5)).astype(np.float32)
  p, info = ood_sources.ood_prototype("noise", np.zeros((3, 5)), n_ood=40, noise=(feats, logits))
  np.testing.assert_allclose(p, feats[np.sort(want)].mean(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(DetectorError, match="OOD validation set"):
    ood_sources.ood_prototype("oodval", np.zeros((3, 5)))


# -- end to end on a tiny model ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  model = SmallCNN(num_classes=3, in_channels=1, width=4, feature_dim=8, rngs=nnx.Rngs(0))
  fns = ModelFns(model)
  rng = np.random.default_rng(5)
  def split(name, n, labels=True):
    images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    f = extract(fns, fns.params, images, mean=0.5, std=0.25, batch_size=32)
    return Split(name, f.feats, f.logits, images=images,
                 labels=rng.integers(0, 3, size=n).astype(np.int32) if labels else None)
  train = split("train", 90)
  # labels = predictions for two thirds, so the bank is large but not everything
  preds = train.logits.argmax(-1)
  train.labels = np.where(np.arange(90) % 3 == 0, train.labels, preds).astype(np.int32)
  train.labels[:3] = [0, 1, 2]
  ctx = Context(fns=fns, params=fns.params, mean=0.5, std=0.25, train=train,
                ood_val=split("oodval", 30, False), noise=split("noise", 40, False),
                seed=3, batch_size=32)
  return ctx, split("test", 25)


def np_pipeline(ctx, state, split, k=1):
  """The whole GROOD pipeline in numpy float64, from the same feats and prototypes."""
  tr = ctx.train
  preds = tr.logits.argmax(-1)
  ok = preds == tr.labels
  bank = np_grood_grads(tr.feats[ok], state["class_protos"], state["ood_proto"])
  q = np_grood_grads(split.feats, state["class_protos"], state["ood_proto"])
  d = ((q[:, None] - bank[None]) ** 2).sum(-1)
  return -np.sort(d, axis=1)[:, k - 1], ok


@pytest.mark.parametrize("source", ["mixup", "protomean", "oodval", "noise"])
def test_detector_end_to_end(tiny, source):
  ctx, test = tiny
  det = make_detector("grood", source=source, k=2 if source == "oodval" else 1)
  state = det.fit(ctx)
  tr = ctx.train
  want_protos = np.stack([tr.feats[tr.labels == c].mean(0) for c in range(3)])
  np.testing.assert_allclose(state["class_protos"], want_protos, rtol=1e-5, atol=1e-6)
  assert ("early_protos" in state) == (source == "mixup")
  scores = det.score(ctx, state, test)
  assert scores.dtype == np.float32 and scores.shape == (len(test),)
  want, ok = np_pipeline(ctx, state, test, k=det.params["k"])
  assert len(state["bank"]) == ok.sum() < len(tr)                    # correct samples only
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-6)
  d = ((test.feats[:, None].astype(np.float64) - state["class_protos"][None]) ** 2).sum(-1)
  np.testing.assert_array_equal(det.predict(ctx, state, test), d.argmin(1))
  if source == "protomean":
    np.testing.assert_allclose(state["ood_proto"], want_protos.mean(0), rtol=1e-5, atol=1e-6)


def test_mixup_source(tiny):
  ctx, _ = tiny
  tr = ctx.train
  det = make_detector("grood", source="mixup", lam=0.25, n_ood=20)
  state = det.fit(ctx)
  early = ctx.early_of(tr)                                             # (N, F) reference
  q = np.stack([early[tr.labels == c].mean(0) for c in range(3)])
  np.testing.assert_allclose(state["early_protos"], q, rtol=1e-4, atol=1e-5)
  p, info = make_detector("grood", source="mixup", lam=0.25, n_ood=20).ood_prototype(
      ctx, state["class_protos"], state["early_protos"])
  np.testing.assert_allclose(p, state["ood_proto"], rtol=1e-5, atol=1e-6)
  idx = info["idx"]
  assert len(idx) == 20 and len(set(idx)) == 20
  c2 = np.argsort(-tr.logits[idx], axis=1, kind="stable")[:, 1]
  np.testing.assert_array_equal(info["c2"], c2)
  z = 0.25 * early[idx] + 0.75 * q[c2]
  np.testing.assert_allclose(info["z"], z, rtol=1e-4, atol=1e-5)
  e_shape = ctx.fns.early(ctx.params, jnp.zeros((1, 28, 28, 1))).shape[1:]
  h = np.asarray(ctx.fns.from_early(ctx.params, jnp.asarray(z.reshape((-1,) + e_shape))))
  np.testing.assert_allclose(info["feats"], h, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state["ood_proto"], h.mean(0), rtol=1e-4, atol=1e-5)
  tr.early = None                                                      # leave the fixture as found


def test_detector_variants_and_errors(tiny):
  ctx, test = tiny
  base = make_detector("grood", source="protomean")
  st = base.fit(ctx)
  for kw in [dict(grad="closed_form"), dict(metric="cosine"), dict(score_kind="l1norm"),
             dict(wrt="class"), dict(normalize=True, tau=3.0)]:
    det = make_detector("grood", source="protomean", **kw)
    s = det.score(ctx, det.fit(ctx), test)
    assert s.shape == (len(test),) and np.isfinite(s).all(), kw
  np.testing.assert_allclose(
      make_detector("grood", source="protomean", grad="closed_form").score(ctx, st, test),
      base.score(ctx, st, test), rtol=1e-5, atol=1e-7)
  with pytest.raises(DetectorError):
    make_detector("grood", source="testset")
  with pytest.raises(DetectorError):
    make_detector("grood", nope=1)
  assert len(base.grid_points()) == 24          # 4 post-hoc sources x 3 tau x 2 normalize


def np_grood_variant(ctx, split, *, wrt="ood", tau=1.0, normalize=False):
  """GROOD end to end in numpy float64, independently of the library (source protomean, k=1):
  features (L2-normalised if asked), class means by true label, p_ood = their mean, the closed
  form of dL/dp_ood or dL/dp_target with pi = softmax(-||h - p_j|| / tau) over the C+1
  prototypes, the bank of correctly classified train samples, -(squared 1-NN distance)."""
  def feats(s):
    h = np.asarray(s.feats, np.float64)
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12) if normalize else h
  tr = ctx.train
  h_tr = feats(tr)
  c = tr.logits.shape[1]
  protos = np.stack([h_tr[tr.labels == j].mean(0) for j in range(c)])
  ood = protos.mean(0)
  all_p = np.concatenate([protos, ood[None]])

  def grads(h, targets):
    d = np.linalg.norm(h[:, None, :] - all_p[None], axis=2)            # (N, C+1)
    s = -d / tau
    pi = np.exp(s - s.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    col = np.full(len(h), c) if wrt == "ood" else targets
    diff = h - all_p[col]
    unit = diff / np.linalg.norm(diff, axis=1, keepdims=True)
    coef = pi[np.arange(len(h)), col] / tau
    if wrt == "class":
      coef = coef - 1.0 / tau
    return coef[:, None] * unit

  preds = tr.logits.argmax(-1)
  ok = preds == tr.labels
  bank = grads(h_tr[ok], preds[ok])
  q = grads(feats(split), split.logits.argmax(-1))
  d2 = ((q[:, None, :] - bank[None]) ** 2).sum(-1)
  return -d2.min(1)


@pytest.mark.parametrize("kw", [dict(), dict(wrt="class"), dict(tau=3.0), dict(normalize=True),
                                dict(wrt="class", tau=0.5, normalize=True)])
def test_wrt_tau_normalize_change_scores_as_the_closed_form_says(tiny, kw):
  ctx, test = tiny
  det = make_detector("grood", source="protomean", k=1, **kw)
  got = det.score(ctx, det.fit(ctx), test)
  want = np_grood_variant(ctx, test, **kw)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)
  if kw:      # the setting matters: the default's closed form is far from this one's scores
    other = np_grood_variant(ctx, test)
    assert np.abs(other - want).max() > 1e-2 * scale, kw
