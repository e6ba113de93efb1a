"""No recompilation: the number of compilations stays fixed as the number of batches grows.

Two counters: the jitted functions' own caches (`_cache_size()`, one entry per traced shape)
and a `jax.monitoring` listener on XLA backend compilations (every compile in the process).
Each workload runs once with few batches (warm-up: the compilations it needs) and then with
more batches, including a ragged last batch; the second run must compile nothing new.
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
