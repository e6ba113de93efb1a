"""Property tests (hypothesis): metric invariances and bounds, data sources that either load or
raise DataError on any input, blocked exact search equal to brute force at any block size."""

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from grood_jax import metrics
from grood_jax.data.base import DataError, ImageSet
from grood_jax.data.sources import from_array, load_folder, load_npz

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# Integer-valued scores in a small range: many ties, and every transform below is exact.
scores = hnp.arrays(np.float64, st.integers(1, 40), elements=st.integers(-30, 30).map(float))
MONOTONE = [lambda x: 3.0 * x - 7.0, lambda x: x ** 3, lambda x: np.exp(x / 8.0),
            lambda x: np.arctan(x / 4.0)]


@SETTINGS
@given(s_id=scores, s_ood=scores, which=st.integers(0, len(MONOTONE) - 1))
def test_metrics_invariant_to_strictly_increasing_transforms(s_id, s_ood, which):
  f = MONOTONE[which]
  a = metrics.ood_metrics(s_id, s_ood)
  b = metrics.ood_metrics(f(s_id), f(s_ood))
  for k in metrics.METRIC_NAMES:
    assert a[k] == pytest.approx(b[k], abs=1e-12), k


@SETTINGS
@given(s_id=scores, s_ood=scores)
def test_metrics_bounded_and_ties(s_id, s_ood):
  m = metrics.ood_metrics(s_id, s_ood)
  for k in metrics.METRIC_NAMES:
    assert 0.0 <= m[k] <= 1.0, (k, m[k])
  # Swapping the roles mirrors the AUROC (ties count one half on both sides).
  assert metrics.auroc(s_id, s_ood) + metrics.auroc(s_ood, s_id) == pytest.approx(1.0)
  # All tied: no separation at all.
  tied = np.zeros_like(s_id)
  assert metrics.auroc(tied, np.zeros_like(s_ood)) == 0.5


def test_metrics_reject_non_finite():
  with pytest.raises(ValueError, match="non-finite"):
    metrics.auroc(np.array([0.0, np.nan]), np.array([1.0]))


# ----------------------------------------------------------------------------- data sources

DTYPES = st.sampled_from([np.uint8, np.int8, np.int32, np.int64, np.uint16, np.float16,
                          np.float32, np.float64, np.bool_, np.complex64])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6)


def _valid(s, image_shape):
  assert isinstance(s, ImageSet)
  assert s.images.dtype == np.uint8 and s.images.shape[1:] == tuple(image_shape)
  assert len(s) >= 1


@SETTINGS
@given(data=st.data(), dtype=DTYPES, shape=SHAPES,
       image_shape=st.sampled_from([(28, 28, 1), (8, 6, 3)]))
def test_from_array_loads_or_raises_data_error(data, dtype, shape, image_shape):
  images = data.draw(hnp.arrays(dtype, shape))
  try:
    s = from_array(images, name="x", image_shape=image_shape)
  except DataError:
    return
  _valid(s, image_shape)


@SETTINGS
@given(blob=st.binary(max_size=300), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY"]))
def test_npz_garbage_bytes_raise_data_error(tmp_path_factory, blob, prefix):
  path = os.path.join(tmp_path_factory.mktemp("npz"), "x.npz")
  with open(path, "wb") as f:
    f.write(prefix + blob)
  try:
    s = load_npz(path, image_shape=(28, 28, 1))
  except DataError:
    return
  _valid(s, (28, 28, 1))


@SETTINGS
@given(arrays=st.dictionaries(st.sampled_from(["images", "labels", "other"]),
                              hnp.arrays(st.sampled_from([np.uint8, np.float32, np.int64]),
                                         hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)),
                              max_size=3))
def test_npz_random_arrays_load_or_raise_data_error(tmp_path_factory, arrays):
  path = os.path.join(tmp_path_factory.mktemp("npz"), "x.npz")
  np.savez(path, **arrays)
  try:
    s = load_npz(path, image_shape=(28, 28, 1))
  except DataError:
    return
  _valid(s, (28, 28, 1))


@SETTINGS
@given(files=st.lists(st.tuples(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM"]),
                                st.binary(max_size=200)), min_size=0, max_size=4))
def test_folder_of_garbage_files_raises_data_error_or_loads(tmp_path_factory, files):
  root = tmp_path_factory.mktemp("folder")
  for i, (head, body) in enumerate(files):
    with open(os.path.join(root, f"f{i}.png"), "wb") as f:
      f.write(head + body)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      s = load_folder(str(root), image_shape=(28, 28, 1))
  except DataError:
    return
  _valid(s, (28, 28, 1))


# ----------------------------------------------------------------------------- blocked search


@SETTINGS
@given(n=st.integers(1, 60), q=st.integers(1, 20), d=st.integers(1, 5), k=st.integers(1, 4),
       qb=st.integers(1, 8), bb=st.integers(1, 16), seed=st.integers(0, 2 ** 16))
def test_knn_search_any_block_size_equals_brute_force(n, q, d, k, qb, bb, seed):
  """A bank far larger than the blocks (the memory budget) is searched block by block: the
  answer does not depend on the block sizes."""
  from grood_jax.ops import knn_search
  k = min(k, n)
  rng = np.random.default_rng(seed)
  bank = rng.integers(-3, 4, (n, d)).astype(np.float32)      # small integers: exact, with ties
  queries = rng.integers(-3, 4, (q, d)).astype(np.float32)
  dist, idx = knn_search(queries, bank, k, query_block=qb, bank_block=bb)
  full = ((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
  order = np.lexsort((np.broadcast_to(np.arange(n), full.shape), full), axis=-1)[:, :k]
  np.testing.assert_array_equal(dist, np.take_along_axis(full, order, 1))
  np.testing.assert_array_equal(idx, order)
