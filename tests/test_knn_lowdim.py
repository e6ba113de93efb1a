"""The low-dimension kNN paths (issue 17 item 3): the block shapes chosen below D = 512 (short
query blocks, long bank blocks split evenly) and the one- and two-stage chunked block top-k,
each against numpy float64 brute force (exact ties: integer data) or sklearn."""

import jax
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from grood_jax import ops, parallel
from grood_jax.ops import knn as K


def _brute(q, bank, k):
  d = ((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
  idx = np.argsort(d, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(d, idx, 1), idx


def _tied(n, d, q, seed):
  """Small integers: many exact ties, and float32 arithmetic on them is exact."""
  rng = np.random.default_rng(seed)
  bank = rng.integers(-2, 3, (n, d)).astype(np.float32)
  bank[[5, n // 2, n - 1]] = bank[0]
  queries = np.concatenate([rng.integers(-2, 3, (q - 1, d)), bank[[0]]]).astype(np.float32)
  return queries, bank


def test_low_dim_block_shapes():
  qb, bb = K.block_sizes_for_budget(10_000, 100_000, 128, 58)
  assert (qb, bb) == (128, 100_096)                   # one block, chunk-padded
  qb, bb = K.block_sizes_for_budget(10_000, 300_000, 64, 9)
  assert qb == 128 and bb % 256 == 0 and bb <= 131_072
  blocks = -(-300_000 // bb)
  assert blocks == 3 and blocks * bb - 300_000 < 256 * blocks     # nearly equal blocks
  # D >= 512 keeps the earlier preference; 100k rows split into 7 equal blocks
  assert K.block_sizes_for_budget(10_000, 1_000_000, 512, 1) == (1024, 16384)
  assert K.block_sizes_for_budget(10_000, 100_000, 512, 9) == (1024, 14336)
  for budget in (1 << 20, 8 << 20, 64 << 20):
    qb, bb = K.block_sizes_for_budget(10_000, 1_000_000, 64, 58, budget)
    words = qb * (64 + 8 * 58) + bb * 64 + 3 * qb * (bb + 58)
    assert words * 4 <= budget and qb >= 1 and bb >= 1


def test_selection_levels():
  assert K._selection_levels(100_096, 58) == (256, 16)
  assert K._selection_levels(100_096, 9) == (256,)
  assert K._selection_levels(16384, 58) == (64, 16)
  assert K._selection_levels(16384, 9) == (256,)
  assert K._selection_levels(512, 9) == ()


@pytest.mark.parametrize("k,bank_block,levels", [
    (50, None, (128, 16)),        # the default low-dim shape: one block of 40192 rows
    (20, None, (256, 16)),
    (1, None, (256,)),
    (50, 16384, (64, 16)),        # three blocks, the last one padded
    (20, 4096, (32,)),
])
def test_chunked_top_k_with_ties_equals_brute_force(k, bank_block, levels):
  q, bank = _tied(40_000, 4, 150, seed=k)
  kc = k + K.rerank_margin(k, len(bank))
  nb = bank_block or K.block_sizes_for_budget(len(q), len(bank), 4, kc)[1]
  assert K._selection_levels(nb, kc) == levels          # the path under test is taken
  d_ref, i_ref = _brute(q, bank, k)
  # exact=False: the block search alone (no re-rank to repair it), exact on integer data
  d, i = K.knn_search(q, bank, k, bank_block=bank_block, exact=False)
  np.testing.assert_array_equal(i, i_ref)
  np.testing.assert_array_equal(d, d_ref.astype(np.float32))
  d, i = K.knn_search(q, bank, k, bank_block=bank_block)
  np.testing.assert_array_equal(i, i_ref)
  np.testing.assert_array_equal(d, d_ref.astype(np.float32))


@pytest.mark.parametrize("dim", [16, 64])
def test_low_dim_float_search_against_sklearn(dim):
  rng = np.random.default_rng(dim)
  centres = rng.normal(size=(20, dim)) * 2.0
  bank = (rng.normal(size=(30_000, dim)) + centres[rng.integers(0, 20, 30_000)]).astype(
      np.float32)
  q = (rng.normal(size=(200, dim)) + centres[rng.integers(0, 20, 200)]).astype(np.float32)
  k = 50
  dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(
      bank.astype(np.float64)).kneighbors(q.astype(np.float64))
  d, i = ops.knn_search(q, bank, k)
  np.testing.assert_array_equal(i, idx)
  np.testing.assert_allclose(d, dist ** 2, rtol=1e-5, atol=1e-5)
  placed = ops.put_bank(bank, k)
  d2, i2 = ops.knn_search(q, placed, k)
  np.testing.assert_array_equal(i2, idx)
  np.testing.assert_allclose(d2, dist ** 2, rtol=1e-5, atol=1e-5)


def test_sharded_search_takes_the_same_paths():
  q, bank = _tied(40_000, 4, 60, seed=3)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  for k in (1, 50):
    d_ref, i_ref = _brute(q, bank, k)
    bank_obj = ops.shard_bank(bank, mesh, k=k + K.rerank_margin(k, len(bank)))
    assert K._selection_levels(bank_obj.bank_block, k + K.rerank_margin(k, len(bank)))
    d, i = ops.sharded_knn_search(q, bank_obj, k, mesh, exact=False)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref.astype(np.float32))
    d, i = ops.sharded_knn_search(q, bank_obj, k, mesh)
    np.testing.assert_array_equal(i, i_ref)
