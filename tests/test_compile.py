"""No recompilation: the number of compilations stays fixed as the number of batches grows.

Two counters: the jitted functions' own caches (`_cache_size()`, one entry per traced shape)
and a `jax.monitoring` listener on XLA backend compilations (every compile in the process).
Each workload runs once with few batches (warm-up: the compilations it needs) and then with
more batches, including a ragged last batch; the second run must compile nothing new. The same
for a --select run (a 6-point grid after a 2-point one: grid values are traced, not static) and
for GROOD's mix-up source; checkpoint.load_model builds the model abstractly (nnx.eval_shape)
and restores bit-identical arrays.
"""

import contextlib

import jax
import numpy as np
import pytest
from flax import nnx

from grood_jax import features
from grood_jax.ops import knn as _common
from grood_jax.grood import loss as grood_loss
from grood_jax.modelfns import ModelFns
from grood_jax.models.cnn import SmallCNN

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_backend_compiles():
  counter = {"n": 0}

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _BACKEND_COMPILE_EVENT:
      counter["n"] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_extract_compiles_once_per_shape():
  fns = ModelFns(SmallCNN(num_classes=3, in_channels=1, width=8, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  kw = dict(mean=0.5, std=0.25, batch_size=16)
  features.extract(fns, fns.params, rng.integers(0, 255, (40, 28, 28, 1), np.uint8), **kw)
  size = fns.jit_forward._cache_size()
  assert size == 1
  with count_backend_compiles() as c:
    # 7 batches, the last ragged (100 = 6 x 16 + 4)
    out = features.extract(fns, fns.params, rng.integers(0, 255, (100, 28, 28, 1), np.uint8),
                           **kw)
  assert out.feats.shape[0] == 100
  assert fns.jit_forward._cache_size() == size
  assert c["n"] == 0


def test_batched_grads_compiles_once_per_shape():
  rng = np.random.default_rng(1)
  protos, ood = rng.normal(size=(4, 8)), rng.normal(size=(8,))
  for method, fn in [("autodiff", grood_loss._prototype_grads),
                     ("closed_form", grood_loss._closed_form)]:
    grood_loss.batched_grads(rng.normal(size=(35, 8)), protos, ood, rng.integers(0, 4, 35),
                             batch_size=16, method=method)
    size = fn._cache_size()
    with count_backend_compiles() as c:
      g = grood_loss.batched_grads(rng.normal(size=(203, 8)), protos, ood,
                                   rng.integers(0, 4, 203), batch_size=16, method=method)
    assert g.shape == (203, 8)
    assert fn._cache_size() == size and c["n"] == 0, method


@pytest.mark.parametrize("k", [1, 5])
def test_knn_search_compiles_once_per_shape(k):
  rng = np.random.default_rng(2)
  kw = dict(query_block=32, bank_block=512)
  _common.knn_search(rng.normal(size=(70, 16)), rng.normal(size=(1200, 16)), k, **kw)
  size = _common._knn_merge_block._cache_size()
  with count_backend_compiles() as c:
    # 10x the query blocks (ragged last), 4x the bank blocks (ragged last)
    d, i = _common.knn_search(rng.normal(size=(700, 16)), rng.normal(size=(4000, 16)), k, **kw)
  assert d.shape == (700, k)
  assert _common._knn_merge_block._cache_size() == size
  assert c["n"] == 0


# ----------------------------------------------------------------------------- --select

# (detector, a 2-point grid, a 6-point grid of other values): none of these values sets a
# shape, so after the 2-point selection the 6-point one must compile nothing.
_SELECT_GRIDS = [
    ("ash", {"percentile": [65.0], "variant": ["s", "b"]},
     {"percentile": [70.0, 80.0, 95.0], "variant": ["p", "s"]}),
    ("odin", {"T": [1.0], "eps": [0.0, 0.0014]},
     {"T": [10.0, 100.0, 1000.0], "eps": [0.0007, 0.0028]}),
    ("scale", {"percentile": [65.0, 90.0]},
     {"percentile": [70.0, 75.0, 80.0, 85.0, 95.0, 99.0]}),
    ("gen", {"gamma": [0.1], "M": [1, 2]}, {"gamma": [0.01, 0.5, 1.0], "M": ["half", "all"]}),
    ("react", {"percentile": [85.0, 90.0]},
     {"percentile": [50.0, 70.0, 80.0, 95.0, 98.0, 99.0]}),
]


def _tiny_select_run(tmp_path):
  """A --select-style setup on a tiny model restored from a checkpoint: (ctx, id_val, ood_val)."""
  import ml_collections

  from grood_jax import checkpoint
  from grood_jax.detectors import Context, Split
  from grood_jax.models import build_model

  kw = {"width": 4, "feature_dim": 32}
  checkpoint.save(tmp_path, 1, build_model("cnn", num_classes=6, in_channels=1, seed=0, **kw),
                  None, ml_collections.ConfigDict({"model": {"name": "cnn", "kwargs": kw}}))
  model, _, _ = checkpoint.load_model(tmp_path)
  fns = ModelFns(model)
  rng = np.random.default_rng(3)

  def split(name, n):
    images = rng.integers(0, 255, (n, 28, 28, 1), np.uint8)
    f = features.extract(fns, fns.params, images, mean=0.5, std=0.25, batch_size=32)
    return Split(name, f.feats, f.logits, images=images)

  ctx = Context(fns=fns, params=fns.params, mean=0.5, std=0.25, train=split("train", 48),
                batch_size=16)
  return ctx, split("id_val", 20), split("ood_val", 12)


def test_select_compiles_do_not_grow_with_the_grid(tmp_path, monkeypatch):
  """Grid values are traced: a 6-point selection after a 2-point one compiles nothing new."""
  from grood_jax import scoring
  from grood_jax.detectors.registry import detector_class

  ctx, id_val, ood_val = _tiny_select_run(tmp_path)

  def select(which):
    counts = {}
    for name, *grids in _SELECT_GRIDS:
      monkeypatch.setattr(detector_class(name), "grid", grids[which])
      with count_backend_compiles() as c:
        _, grid = scoring.select_params(name, {}, ctx, id_val, ood_val, log=lambda s: None)
      assert len(grid) == (2, 6)[which], name
      counts[name] = c["n"]
    return counts

  select(0)                                            # warm-up: what one grid point needs
  assert select(1) == {name: 0 for name, *_ in _SELECT_GRIDS}


def test_load_model_builds_abstractly_and_restores_bit_identical(tmp_path, monkeypatch):
  """checkpoint.load_model initialises nothing (the model is built under nnx.eval_shape) and
  restores the saved arrays exactly: same tree, dtypes, values and forward pass."""
  import ml_collections

  from grood_jax import checkpoint, models

  kw = {"width": 4, "feature_dim": 8}
  model = models.build_model("cnn", num_classes=6, in_channels=1, seed=7, **kw)
  checkpoint.save(tmp_path, 1, model, None,
                  ml_collections.ConfigDict({"model": {"name": "cnn", "kwargs": kw}}))
  built, real = [], models.build_model

  def spy(*args, **kwargs):
    m = real(*args, **kwargs)
    built.append(all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(m))))
    return m

  monkeypatch.setattr(models, "build_model", spy)
  loaded, _, step = checkpoint.load_model(tmp_path)
  assert step == 1 and built == [True]               # built once, abstractly (tracers only)
  a, b = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(loaded))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  model.eval()
  x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  assert np.array_equal(np.asarray(model(x)), np.asarray(loaded(x)))


def test_mixup_feats_compiles_once_per_shape():
  """GROOD's mix-up source: a second call (other lam, other seed, same sizes) compiles nothing."""
  from grood_jax.grood import ood_sources

  fns = ModelFns(SmallCNN(num_classes=3, in_channels=1, width=4, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(4)
  images = rng.integers(0, 255, (30, 28, 28, 1), np.uint8)
  f = features.extract(fns, fns.params, images, mean=0.5, std=0.25, batch_size=16,
                       with_early=True)
  kw = dict(mean=0.5, std=0.25, n_ood=12, batch_size=8)
  for layer in (None, "block2"):
    dim = int(np.prod(fns.split_shape(fns.params, layer or "early", (28, 28, 1))))
    protos = rng.normal(size=(3, dim)).astype(np.float32)
    for early in ((f.early, None) if layer is None else (None,)):
      ood_sources.mixup_feats(fns, fns.params, images, f.logits, protos, lam=0.5, seed=0,
                              early_NxF=early, layer=layer, **kw)
      with count_backend_compiles() as c:
        feats, _ = ood_sources.mixup_feats(fns, fns.params, images, f.logits, protos, lam=0.3,
                                           seed=1, early_NxF=early, layer=layer, **kw)
      assert feats.shape[0] == 12 and c["n"] == 0, (layer, early is None)
