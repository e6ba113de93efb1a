"""The reference's GROOD knobs (issue 15): each changes the result exactly as an independent
numpy computation says — mix-up split point, pooled sources, filter_ood, noise_ref, sampling
ratio, prototypes from ID validation data, no_gradients, distance_loss, uses_outlier_data."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grood_jax.detectors import Context, DetectorError, Split, make_detector
from grood_jax.features import extract, normalize
from grood_jax.grood import loss, ood_sources
from grood_jax.modelfns import ModelFns
from grood_jax.models.cnn import DenseCNN, SmallCNN
from grood_jax.models.resnet import ResNet18

MEAN, STD = 0.5, 0.25


@pytest.fixture(scope="module")
def tiny():
  model = SmallCNN(num_classes=3, in_channels=1, width=4, feature_dim=8, rngs=nnx.Rngs(0))
  fns = ModelFns(model)
  rng = np.random.default_rng(5)

  def split(name, n, labels=True):
    images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    f = extract(fns, fns.params, images, mean=MEAN, std=STD, batch_size=32)
    return Split(name, f.feats, f.logits, images=images,
                 labels=rng.integers(0, 3, size=n).astype(np.int32) if labels else None)
  train = split("train", 90)
  preds = train.logits.argmax(-1)
  train.labels = np.where(np.arange(90) % 3 == 0, train.labels, preds).astype(np.int32)
  train.labels[:3] = [0, 1, 2]
  ctx = Context(fns=fns, params=fns.params, mean=MEAN, std=STD, train=train,
                ood_val=split("oodval", 30, False), noise=split("noise", 250, False),
                seed=3, batch_size=32)
  return ctx, split("test", 25)


# -- independent numpy pieces (float64) ------------------------------------------------------

def np_unit_norm(h):
  return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)


def np_class_means(h, labels, c):
  return np.stack([h[labels == j].mean(0) for j in range(c)])


def np_grads(h, protos, ood, targets, *, tau=1.0, wrt="ood", distance=False):
  all_p = np.concatenate([protos, ood[None]]).astype(np.float64)
  c = len(protos)
  d = np.linalg.norm(h[:, None, :] - all_p[None], axis=2)
  s = -d / tau
  pi = np.exp(s - s.max(1, keepdims=True))
  pi /= pi.sum(1, keepdims=True)
  col = np.full(len(h), c) if wrt == "ood" else np.asarray(targets)
  diff = h - all_p[col]
  unit = diff / np.linalg.norm(diff, axis=1, keepdims=True)
  if distance:
    coef = np.full(len(h), 1.0 / (len(all_p) * tau))
  else:
    coef = pi[np.arange(len(h)), col] / tau - (1.0 / tau if wrt == "class" else 0.0)
  return coef[:, None] * unit


def np_knn_scores(q, bank, k=1):
  d2 = ((q[:, None, :] - bank[None]) ** 2).sum(-1)
  return -np.sort(d2, axis=1)[:, k - 1]


def np_scores(ctx, test, protos, ood, *, tau=1.0, wrt="ood", distance=False, train=None):
  tr = ctx.train if train is None else train
  preds = tr.logits.argmax(-1)
  ok = preds == tr.labels
  h = tr.feats.astype(np.float64)
  bank = np_grads(h[ok], protos, ood, preds[ok], tau=tau, wrt=wrt, distance=distance)
  q = np_grads(test.feats.astype(np.float64), protos, ood, test.logits.argmax(-1), tau=tau,
               wrt=wrt, distance=distance)
  return np_knn_scores(q, bank)


def close(got, want, rtol=1e-3):
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-4 * scale)


def far_apart(a, b, frac=1e-2):
  return np.abs(np.asarray(a) - np.asarray(b)).max() > frac * np.abs(b).max()


# -- split points ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls,shape,kw", [(SmallCNN, (3, 28, 28, 1), dict(width=4)),
                                          (DenseCNN, (3, 28, 28, 1), dict(width=4)),
                                          (ResNet18, (3, 32, 32, 3), dict(width=4))])
def test_split_points_compose_to_the_forward_pass(cls, shape, kw):
  model = cls(num_classes=3, in_channels=shape[-1], rngs=nnx.Rngs(1), **kw)
  fns = ModelFns(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  e, h, _ = fns.forward(fns.params, x)
  assert len(fns.split_points) >= 2
  np.testing.assert_array_equal(fns.features_at(fns.params, fns.split_points[0], x), e)
  np.testing.assert_array_equal(fns.features_at(fns.params, "early", x), e)
  prev = None
  for name in fns.split_points:
    z = fns.features_at(fns.params, name, x)
    np.testing.assert_allclose(fns.forward_from(fns.params, name, z), h, rtol=1e-5, atol=1e-6)
    assert fns.split_shape(fns.params, name, shape[1:]) == z.shape[1:]
    assert prev is None or z.shape != prev
    prev = z.shape
  with pytest.raises(ValueError):
    fns.resolve_split("nope")


def test_mixup_at_a_later_split_point_is_the_numpy_mixup_there(tiny):
  ctx, test = tiny
  tr = ctx.train
  det = make_detector("grood", source="mixup", layer="block2", lam=0.3, n_ood=20)
  state = det.fit(ctx)
  fns, params = ctx.fns, ctx.params
  x_tr = jnp.asarray(normalize(tr.images, MEAN, STD))
  maps = np.asarray(fns.features_at(params, "block2", x_tr), np.float64)        # (N, 7, 7, 8)
  q = np_class_means(maps.reshape(len(maps), -1), tr.labels, 3)
  np.testing.assert_allclose(state["early_protos"], q, rtol=1e-4, atol=1e-5)
  idx = np.sort(np.random.default_rng(ctx.seed).choice(len(tr), 20, replace=False))
  c2 = np.argsort(-tr.logits[idx], axis=1, kind="stable")[:, 1]
  z = 0.3 * maps[idx] + 0.7 * q[c2].reshape((-1,) + maps.shape[1:])
  h = np.asarray(fns.forward_from(params, "block2", jnp.asarray(z, jnp.float32)), np.float64)
  np.testing.assert_allclose(state["ood_proto"], h.mean(0), rtol=1e-4, atol=1e-5)
  got = det.score(ctx, state, test)
  close(got, np_scores(ctx, test, state["class_protos"], h.mean(0)))
  # the split point matters, and "early" / "block1" / the default are one and the same
  early = make_detector("grood", source="mixup", lam=0.3, n_ood=20)
  s_early = early.score(ctx, early.fit(ctx), test)
  assert far_apart(got, s_early)
  b1 = make_detector("grood", source="mixup", layer="block1", lam=0.3, n_ood=20)
  np.testing.assert_array_equal(b1.score(ctx, b1.fit(ctx), test), s_early)
  last = make_detector("grood", source="mixup", layer="last", lam=0.3, n_ood=20)
  np.testing.assert_array_equal(last.fit(ctx)["ood_proto"], state["ood_proto"])
  with pytest.raises(DetectorError, match="split points"):
    make_detector("grood", layer="layer3").fit(ctx)


# -- pooled sources and filter_ood -----------------------------------------------------------

def test_pooled_sources_are_the_mean_of_all_their_rows(tiny):
  ctx, test = tiny
  tr = ctx.train
  for normalize_ in (False, True):
    h_tr = tr.feats.astype(np.float64)
    h_val = ctx.ood_val.feats.astype(np.float64)
    if normalize_:
      h_tr, h_val = np_unit_norm(h_tr), np_unit_norm(h_val)
    protos = np_class_means(h_tr, tr.labels, 3)
    rows = np.sort(np.random.default_rng(ctx.seed).choice(len(h_val), 20, replace=False))
    want = np.concatenate([protos, h_val[rows]]).mean(0)                # 3 + 20 rows pooled
    det = make_detector("grood", source="protomean+oodval", n_ood=20, normalize=normalize_)
    state = det.fit(ctx)
    np.testing.assert_allclose(state["ood_proto"], want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - protos.mean(0)).max() > 1e-4         # both sources count
    assert np.abs(want - h_val[rows].mean(0)).max() > 1e-4
    if normalize_:
      test_h = Split("t", np_unit_norm(test.feats.astype(np.float64)), test.logits)
      close(det.score(ctx, state, test),
            np_scores(ctx, test_h, protos, want,
                      train=Split("tr", h_tr, tr.logits, labels=tr.labels)))
  # mixup+noise: the rows of each single source, pooled (count-weighted)
  _, i_mix = make_detector("grood", source="mixup", n_ood=20).ood_prototype(
      ctx, np_class_means(tr.feats, tr.labels, 3),
      make_detector("grood", source="mixup").fit(ctx)["early_protos"])
  both = make_detector("grood", source="mixup+noise", n_ood=20).fit(ctx)
  noise_rows = ctx.noise.feats[ood_sources.noise_keep(ctx.noise.logits, 20)]
  np.testing.assert_allclose(both["ood_proto"],
                             np.concatenate([i_mix["feats"], noise_rows]).mean(0),
                             rtol=1e-5, atol=1e-6)


def np_filter(rows, protos, q=0.8, min_keep=2):
  m = np.linalg.norm(rows[:, None, :] - protos[None], axis=2).min(1)
  keep = np.flatnonzero(m > np.quantile(m, q))
  if len(keep) < min_keep:
    keep = np.argsort(-m)[:min_keep]
  return np.sort(keep)


def test_filter_ood_keeps_rows_far_from_every_class_prototype(tiny):
  ctx, test = tiny
  tr = ctx.train
  protos = np_class_means(tr.feats.astype(np.float64), tr.labels, 3)
  h_val = ctx.ood_val.feats.astype(np.float64)
  rows = np.sort(np.random.default_rng(ctx.seed).choice(len(h_val), 25, replace=False))
  kept = np_filter(h_val[rows], protos)
  assert len(kept) == 5                                   # 25 distinct distances, top 20 %
  det = make_detector("grood", source="oodval", n_ood=25, filter_ood=True)
  state = det.fit(ctx)
  want = h_val[rows][kept].mean(0)
  np.testing.assert_allclose(state["ood_proto"], want, rtol=1e-5, atol=1e-6)
  assert np.abs(want - h_val[rows].mean(0)).max() > 1e-4
  close(det.score(ctx, state, test), np_scores(ctx, test, protos, want))
  kept_q = np_filter(h_val[rows], protos, q=0.5)
  st5 = make_detector("grood", source="oodval", n_ood=25, filter_ood=True,
                      filter_quantile=0.5).fit(ctx)
  np.testing.assert_allclose(st5["ood_proto"], h_val[rows][kept_q].mean(0), rtol=1e-5, atol=1e-6)
  # noise: filtered per batch of 100 (its 10 kept rows -> 2 each); 250 rows -> 3 batches
  keep = ood_sources.noise_keep(ctx.noise.logits, 30)
  h_n = ctx.noise.feats.astype(np.float64)
  parts = [keep[keep // 100 == b] for b in range(3)]
  filt = np.concatenate([p[np_filter(h_n[p], protos)] for p in parts])
  assert len(filt) == 6
  stn = make_detector("grood", source="noise", n_ood=30, filter_ood=True).fit(ctx)
  np.testing.assert_allclose(stn["ood_proto"], h_n[filt].mean(0), rtol=1e-5, atol=1e-6)
  # fewer than 2 above the quantile: the 2 farthest (equal distances: nothing is above)
  same = np.tile(protos[:1] + 1.0, (6, 1))
  assert len(ood_sources.filter_far(same, protos)) == 2


# -- the reference's noise -------------------------------------------------------------------

def np_blur(img_HxW, sigma, kx=5, ky=7):
  """A direct 2-D convolution with the (ky, kx) Gaussian, reflect padding (torchvision)."""
  def k1(n):
    x = np.arange(n) - (n - 1) / 2
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()
  k2 = np.outer(k1(ky), k1(kx))
  p = np.pad(img_HxW, ((ky // 2,) * 2, (kx // 2,) * 2), mode="reflect")
  h, w = img_HxW.shape
  return np.array([[(p[i:i + ky, j:j + kx] * k2).sum() for j in range(w)] for i in range(h)])


def test_noise_ref_is_the_references_recipe(tiny):
  ctx, test = tiny
  imgs, sigmas = ood_sources.noise_ref_images(150, (28, 28, 1), seed=ctx.seed)
  assert imgs.shape == (200, 28, 28, 1) and imgs.dtype == np.float32 and len(sigmas) == 2
  rng = np.random.default_rng(ctx.seed)
  raw = []
  for b in range(2):
    s = rng.uniform(0.2, 5.0)
    assert s == sigmas[b]
    raw.append(rng.random((100, 28, 28, 1), dtype=np.float32))
  for b, i in ((0, 0), (0, 57), (1, 99)):
    np.testing.assert_allclose(imgs[b * 100 + i, ..., 0], np_blur(raw[b][i, ..., 0], sigmas[b]),
                               rtol=1e-5, atol=1e-6)
  assert 0.0 <= imgs.min() and imgs.max() < 1.0
  # unnormalised into the model; per batch the 10 lowest logsumexp
  e, h, f = (np.asarray(a, np.float64) for a in ctx.fns.forward(ctx.params, jnp.asarray(imgs)))
  lse = np.log(np.exp(f - f.max(1, keepdims=True)).sum(1)) + f.max(1)
  keep = np.sort(np.concatenate([b * 100 + np.argsort(lse[b * 100:(b + 1) * 100])[:10]
                                 for b in range(2)]))
  det = make_detector("grood", source="noise_ref", n_ood=150)
  state = det.fit(ctx)
  np.testing.assert_allclose(state["ood_proto"], h[keep].mean(0), rtol=1e-4, atol=1e-5)
  close(det.score(ctx, state, test), np_scores(ctx, test, state["class_protos"], h[keep].mean(0)))
  # the reference's count: n_ood = 100 -> one batch, 10 rows; ours ("noise") keeps 100
  _, info = make_detector("grood", source="noise_ref").ood_prototype(ctx, state["class_protos"])
  assert len(info["feats"]) == 10
  normed = ctx.fns.forward(ctx.params, jnp.asarray(normalize(imgs, MEAN, STD)))[1]
  assert not np.allclose(np.asarray(normed)[keep].mean(0), state["ood_proto"], atol=1e-3)


# -- sampling ratio, prototypes from ID val --------------------------------------------------

def test_sampling_ratio_fits_on_a_seeded_fraction(tiny):
  ctx, test = tiny
  tr = ctx.train
  idx = np.sort(np.random.default_rng(ctx.seed).choice(len(tr), 45, replace=False))
  sub = Split("sub", tr.feats[idx], tr.logits[idx], labels=tr.labels[idx])
  protos = np_class_means(sub.feats.astype(np.float64), sub.labels, 3)
  det = make_detector("grood", source="protomean", sampling_ratio=0.5)
  state = det.fit(ctx)
  np.testing.assert_allclose(state["class_protos"], protos, rtol=1e-5, atol=1e-6)
  ok = sub.logits.argmax(-1) == sub.labels
  assert len(state["bank"]) == ok.sum()
  got = det.score(ctx, state, test)
  close(got, np_scores(ctx, test, protos, protos.mean(0), train=sub))
  full = make_detector("grood", source="protomean")
  assert far_apart(got, full.score(ctx, full.fit(ctx), test))


def test_prototypes_from_id_val(tiny):
  ctx, test = tiny
  with pytest.raises(DetectorError, match="id_val"):
    make_detector("grood", source="protomean", protos_from="id_val").fit(ctx)
  rng = np.random.default_rng(9)
  images = rng.integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
  f = extract(ctx.fns, ctx.params, images, mean=MEAN, std=STD, batch_size=32)
  labels = np.arange(40, dtype=np.int32) % 3
  ctx.id_val = Split("id_val", f.feats, f.logits, images=images, labels=labels)
  try:
    det = make_detector("grood", source="protomean", protos_from="id_val")
    state = det.fit(ctx)
    protos = np_class_means(f.feats.astype(np.float64), labels, 3)
    np.testing.assert_allclose(state["class_protos"], protos, rtol=1e-5, atol=1e-6)
    close(det.score(ctx, state, test), np_scores(ctx, test, protos, protos.mean(0)))
  finally:
    del ctx.id_val


# -- no_gradients and distance_loss ----------------------------------------------------------

@pytest.mark.parametrize("wrt", ["ood", "class"])
def test_no_gradients_scores_by_distance_to_a_prototype(tiny, wrt):
  ctx, test = tiny
  det = make_detector("grood", source="protomean", no_gradients=True, wrt=wrt)
  state = det.fit(ctx)
  assert len(state["bank"]) == 0
  h = test.feats.astype(np.float64)
  if wrt == "ood":
    want = np.linalg.norm(h - state["ood_proto"], axis=1)
  else:
    want = -np.linalg.norm(h - state["class_protos"][test.logits.argmax(-1)], axis=1)
  np.testing.assert_allclose(det.score(ctx, state, test), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrt,tau", [("ood", 1.0), ("ood", 4.0), ("class", 1.0)])
def test_distance_loss_gradients_are_scaled_unit_vectors(tiny, wrt, tau):
  ctx, test = tiny
  det = make_detector("grood", source="protomean", distance_loss=True, wrt=wrt, tau=tau)
  state = det.fit(ctx)
  protos, ood = state["class_protos"].astype(np.float64), state["ood_proto"].astype(np.float64)
  t = test.logits.argmax(-1)
  g = loss.batched_grads(test.feats, protos, ood, t, wrt=wrt, tau=tau, loss="distance")
  want = np_grads(test.feats.astype(np.float64), protos, ood, t, tau=tau, wrt=wrt, distance=True)
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0 / (4 * tau), rtol=1e-5)
  cf = loss.batched_grads(test.feats, protos, ood, t, wrt=wrt, tau=tau, loss="distance",
                          method="closed_form")
  np.testing.assert_allclose(cf, g, rtol=1e-4, atol=1e-6)
  got = det.score(ctx, state, test)
  close(got, np_scores(ctx, test, protos, ood, tau=tau, wrt=wrt, distance=True))
  # on spread prototypes the NCP gradient is far from the distance-loss one (norm pi / tau)
  rng = np.random.default_rng(0)
  P, h = rng.normal(size=(3, 5)) * 3, rng.normal(size=(6, 5)) * 3
  o, t6 = rng.normal(size=5), rng.integers(0, 3, 6)
  g_d = loss.batched_grads(h, P, o, t6, wrt=wrt, tau=tau, loss="distance")
  g_n = loss.batched_grads(h, P, o, t6, wrt=wrt, tau=tau)
  np.testing.assert_allclose(g_d, np_grads(h, P, o, t6, tau=tau, wrt=wrt, distance=True),
                             rtol=1e-4, atol=1e-6)
  assert np.abs(g_d - g_n).max() > 0.05 / tau


# -- outlier data, parameters ----------------------------------------------------------------

def test_uses_outlier_data_and_parameter_errors():
  assert make_detector("grood", source="oodval").uses_outlier_data() is True
  assert make_detector("grood", source="mixup+oodval").uses_outlier_data() is True
  for src in ("mixup", "noise", "noise_ref", "protomean", "mixup+noise"):
    assert make_detector("grood", source=src).uses_outlier_data() is False
  for name in ("knn", "msp", "mahalanobis"):
    assert make_detector(name).uses_outlier_data() is False
  for bad in (dict(source="mixup+testset"), dict(source="noise+noise"), dict(source=""),
              dict(sampling_ratio=0.0), dict(sampling_ratio=1.5), dict(filter_quantile=1.0),
              dict(protos_from="test"), dict(no_gradients=True, distance_loss=True)):
    with pytest.raises(DetectorError):
      make_detector("grood", **bad)


def test_new_knobs_at_their_defaults_leave_the_default_numbers(tiny):
  ctx, test = tiny
  base = make_detector("grood")
  s0 = base.score(ctx, base.fit(ctx), test)
  explicit = make_detector("grood", layer="early", filter_ood=False, sampling_ratio=1.0,
                           protos_from="train", no_gradients=False, distance_loss=False)
  np.testing.assert_array_equal(explicit.score(ctx, explicit.fit(ctx), test), s0)
  assert len(base.grid_points()) == 24
  assert "oodval" not in {p["source"] for p in base.grid_points()}


# -- fused per-chunk scoring (issue 18) --------------------------------------------------------

def test_fused_scoring_never_holds_a_whole_set_of_gradients(tiny, monkeypatch):
  """score() goes gradients -> kNN chunk by chunk against a bank placed once: the same scores
  as a whole-set gradient array searched at once, with no gradient call over more than one
  chunk and the bank put on the device once."""
  import grood_jax.detectors.grood as gmod
  from grood_jax.grood import search as gsearch
  from grood_jax.grood.loss import batched_grads
  from grood_jax.ops import knn_search
  ctx, test = tiny
  for p in (dict(source="protomean"), dict(source="protomean", metric="cosine", k=3)):
    det = make_detector("grood", **p)
    st = det.fit(ctx)
    g_all = batched_grads(test.feats, st["class_protos"], st["ood_proto"],
                          test.logits.argmax(-1), method="closed_form")
    bank = st["bank"]
    if p.get("metric") == "cosine":
      norm = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
      g_all, bank = norm(g_all), norm(bank)
    d, _ = knn_search(g_all, bank, int(det.params["k"]))
    want = -d[:, -1] / (2.0 if p.get("metric") == "cosine" else 1.0)
    rows, placed = [], []
    real_grads, real_place = gmod._loss.batched_grads, gsearch.place_bank
    monkeypatch.setattr(gmod, "SCORE_CHUNK", 7)
    monkeypatch.setattr(gmod._loss, "batched_grads",
                        lambda f, *a, **kw: rows.append(len(f)) or real_grads(f, *a, **kw))
    monkeypatch.setattr(gsearch, "place_bank",
                        lambda *a, **kw: placed.append(1) or real_place(*a, **kw))
    got = det.score(ctx, st, test)
    monkeypatch.undo()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert rows == [7, 7, 7, 4] and placed == [1], (rows, placed)


def test_a_placed_bank_gives_the_same_search():
  from grood_jax.ops import DeviceBank, knn_search, put_bank
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(300, 5)).astype(np.float32)
  q = rng.normal(size=(40, 5)).astype(np.float32)
  placed = put_bank(bank, 4, bank_block=64)
  assert isinstance(placed, DeviceBank) and len(placed) == 300
  d0, i0 = knn_search(q, bank, 4)
  for chunk in (q[:13], q[13:]):                       # reused across query chunks
    d, i = knn_search(chunk, placed, 4)
    ref = ((chunk[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(i, np.argsort(ref, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(d, np.sort(ref, axis=1)[:, :4], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([knn_search(q[:13], placed, 4)[1],
                                                knn_search(q[13:], placed, 4)[1]]), i0)
