"""The harness: selection refits every grid point, the feature cache is keyed by checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from grood_jax import scoring
from grood_jax.data.base import ImageSet
from grood_jax.detectors import REGISTRY, Context, Detector, Split, make_detector
from grood_jax.modelfns import ModelFns
from grood_jax.models.cnn import SmallCNN


class _SignDetector(Detector):
  """score = state['sign'] * feats[:, 0]; only sign=+1 ranks ID above OOD."""
  name = "_test_sign"
  defaults = {"sign": -1}
  grid = {"sign": [-1, 0, 1]}
  fits = []

  def fit(self, ctx):
    _SignDetector.fits.append(self.params["sign"])
    return {"sign": np.float32(self.params["sign"])}

  def score(self, ctx, state, split):
    # Reads the fitted state, not self.params: a state reused across grid points would give
    # every point the same scores and selection would keep the first point.
    return state["sign"] * split.feats[:, 0]


@pytest.fixture
def sign_detector():
  REGISTRY[_SignDetector.name] = _SignDetector
  _SignDetector.fits.clear()
  yield _SignDetector
  del REGISTRY[_SignDetector.name]


def _split(name, x0, n=50, seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n, 4)).astype(np.float32)
  feats[:, 0] += x0
  return Split(name=name, feats=feats, logits=np.zeros((n, 3), np.float32))


def test_selection_picks_best_and_refits_every_point(sign_detector):
  ctx = Context(fns=None, params=None, mean=0.0, std=1.0, train=_split("train", 3.0))
  chosen, grid = scoring.select_params("_test_sign", {}, ctx, _split("idval", 3.0, seed=1),
                                       _split("oodval", -3.0, seed=2), log=lambda s: None)
  assert chosen["sign"] == 1
  assert sorted(_SignDetector.fits) == [-1, 0, 1]          # one fresh fit per grid point
  aucs = {g["params"]["sign"]: g["auroc"] for g in grid}
  assert aucs[1] > 0.99 and aucs[-1] < 0.01 and aucs[0] == pytest.approx(0.5)


def test_fit_and_score_metrics_match_direct_computation(sign_detector):
  from grood_jax import metrics
  ctx = Context(fns=None, params=None, mean=0.0, std=1.0, train=_split("train", 3.0))
  det = make_detector("_test_sign", sign=1)
  id_split = _split("id", 1.0, seed=3)
  id_split.labels = np.zeros(50, np.int32)
  ood = _split("ood", 0.0, seed=4)
  per_set, scores, acc, _ = scoring.fit_and_score(det, ctx, id_split, [("far", "ood", ood)])
  assert per_set["ood"]["auroc"] == pytest.approx(metrics.auroc(id_split.feats[:, 0], ood.feats[:, 0]))
  assert per_set["ood"]["group"] == "far"
  assert acc == 1.0  # default predict: argmax of all-zero logits = class 0 = the labels


def test_non_finite_scores_are_refused(sign_detector):
  ctx = Context(fns=None, params=None, mean=0.0, std=1.0, train=_split("train", 3.0))
  det = make_detector("_test_sign", sign=1)
  bad = _split("bad", 0.0)
  bad.feats[:3, 0] = np.nan
  from grood_jax.errors import ScoringError
  with pytest.raises(ScoringError, match=r"3 non-finite \(NaN/Inf\) scores"):
    scoring.fit_and_score(det, ctx, _split("id", 1.0), [("far", "bad", bad)])


def _fns(seed):
  return ModelFns(SmallCNN(num_classes=3, width=4, feature_dim=8, rngs=nnx.Rngs(seed)))


def test_feature_cache_is_keyed_by_checkpoint_and_images(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
  data = ImageSet("x", images)
  fa = _fns(0)
  c1 = scoring.FeatureCache(fa, fa.params, mean=0.5, std=0.5, batch_size=8, cache_dir=str(tmp_path))
  s1 = c1.split(data)
  assert (c1.misses, c1.hits) == (1, 0)
  c2 = scoring.FeatureCache(fa, fa.params, mean=0.5, std=0.5, batch_size=8, cache_dir=str(tmp_path))
  s2 = c2.split(data)
  assert (c2.misses, c2.hits) == (0, 1)                     # second run reads the disk cache
  np.testing.assert_array_equal(s1.feats, s2.feats)
  fb = _fns(1)                                              # another checkpoint: recomputed
  c3 = scoring.FeatureCache(fb, fb.params, mean=0.5, std=0.5, batch_size=8, cache_dir=str(tmp_path))
  s3 = c3.split(data)
  assert (c3.misses, c3.hits) == (1, 0)
  assert not np.allclose(s3.feats, s1.feats)
  c1.split(ImageSet("y", images[::-1].copy()))              # other images: recomputed
  assert c1.misses == 2
  # the cached features are the model's own
  _, h, f = fa.jit_forward(fa.params, (images[:5].astype(np.float32) / 255 - 0.5) / 0.5)
  np.testing.assert_allclose(s1.feats[:5], np.asarray(h), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1.logits[:5], np.asarray(f), rtol=1e-5, atol=1e-6)


def test_ood_val_halves_are_disjoint_and_cover():
  images = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2, 1) * 5
  aux, sel = scoring.split_ood_val(ImageSet("v", images), seed=0)
  assert len(aux) + len(sel) == 10
  rows = {r.tobytes() for r in aux.images} | {r.tobytes() for r in sel.images}
  assert len(rows) == 10
  assert not ({r.tobytes() for r in aux.images} & {r.tobytes() for r in sel.images})
