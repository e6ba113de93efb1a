"""Exact k-nearest-neighbour search: the one implementation KNN, Mahalanobis, the low-dim
detectors and GROOD's gradient bank use, on one device or sharded over a mesh.

  d_QxK, i_QxK = knn_search(queries_QxD, bank_NxD, k)             # numpy, ascending, exact
  bank = shard_bank(bank_NxD, mesh); sharded_knn_search(q, bank, k, mesh)   # same result

Candidates by squared L2 distances ||q||^2 - 2 q.b + ||b||^2, one matmul per (query block x
bank block) at precision HIGHEST, clamped at 0; the best k + margin candidates are then re-ranked
by the exact difference sum_j (q_j - b_j)^2 (`exact=True`, the default), so near-ties resolve as
a direct computation would (sklearn); equal distances resolve to the lower bank index. Memory is
bounded by the blocks (`block_sizes_for_budget`: below D = 512 short query blocks and long,
evenly split bank blocks, since there the per-row top-k rather than the matmul dominates),
whatever the bank size; within a block the candidates are narrowed by chunk minima before the
exact top-k (`_block_topk`). Inside
`parallel.data_parallel(mesh)` with several devices `knn_search` shards the bank itself:
each device scans its slice in blocks, the local k best (global indices) are all-gathered and
merged by a final top-k, so the result equals the single-device one.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from grood_jax import parallel
from grood_jax.errors import DetectorError
from grood_jax.ops.numerics import HIGHEST

DEFAULT_MEMORY_BUDGET = 512 << 20    # bytes for one block step of `knn_search`
_CHUNK = 256                         # bank rows per chunk of the block top-k's first stage
_SUBCHUNK = 16                       # rows per sub-chunk of its second stage (k + margin >= 16)
_MAX_QUERY_BLOCK = 1024
_MAX_BANK_BLOCK = 16384
_LOW_DIM = 512                       # below: the low-dimension block preference
_LOW_DIM_QUERY_BLOCK = 128
_LOW_DIM_BANK_BLOCK = 131072
_DIST_COPIES = 3                     # live (Q, B) buffers per block step: dot, fused, top-k


def block_sizes_for_budget(num_queries: int, bank_size: int, dim: int, k: int,
                           budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> tuple[int, int]:
  """(query_block, bank_block) whose per-step buffers fit in `budget_bytes`.

  One step of `knn_search` holds a query block (qb x D), the (qb x bb) distances with up to
  `_DIST_COPIES` live copies of that size (dot output, the fused distance, the top-k input),
  and the running k best (qb x k distances and indices, a few copies). The bank itself is not
  counted: it is the input, held once. Preferences (measured on CPU, see benchmarks/knn.py):
  for D >= 512 query blocks of up to 1024 rows and bank blocks of up to 16384; below that
  (`_LOW_DIM`: the matmul is cheap and the per-row top-k dominates, so few long bank blocks
  per query row pay off) query blocks of up to 128 rows and bank blocks of up to 131072. Bank
  blocks are multiples of 256 (the chunk of the block top-k) where possible, and the bank is
  split into blocks of nearly equal size (100k rows: 7 x 14336, not 7 x 16384 with the last
  one 15 % full). The bank block shrinks first, then the query block. Never below (1, 1); a
  budget too small even for that still gets (1, 1).
  """
  q, n, d, k = max(1, int(num_queries)), max(1, int(bank_size)), max(1, int(dim)), max(1, int(k))
  budget = max(0, int(budget_bytes)) // 4           # in float32 / int32 words
  low = d < _LOW_DIM
  max_qb = _LOW_DIM_QUERY_BLOCK if low else _MAX_QUERY_BLOCK
  max_bb = _LOW_DIM_BANK_BLOCK if low else _MAX_BANK_BLOCK

  def fits(qb, bb):
    return qb * (d + 8 * k) + bb * d + _DIST_COPIES * qb * (bb + k) <= budget

  def round_bank(bb):                               # a multiple of the chunk where possible
    return bb - bb % _CHUNK if bb >= _CHUNK else bb

  def even(bb):                                     # same block count, blocks nearly equal
    if bb < _CHUNK or bb >= n:
      return bb
    per = -(-n // -(-n // bb))
    return min(bb, -(-per // _CHUNK) * _CHUNK)

  bank_cap = -(-n // _CHUNK) * _CHUNK if n > _CHUNK else n     # whole bank, chunk-padded
  bank_cap = min(bank_cap, max_bb)
  qb = min(q, max_qb)
  while True:
    free = budget - qb * (d + 8 * k) - _DIST_COPIES * qb * k
    bb = min(bank_cap, max(0, free) // (d + _DIST_COPIES * qb))
    bb = round_bank(bb)
    if bb >= min(bank_cap, _CHUNK) and fits(qb, bb):
      return qb, even(bb)
    if qb == 1:
      return 1, max(1, bb)
    qb = max(1, qb // 2)


def _augment_bank(b_BxD, n_valid_rows):
  """[b, ||b||^2] (B, D+1); rows at or past n_valid_rows (padding) get ||b||^2 = +inf."""
  bsq_B = jnp.sum(b_BxD * b_BxD, axis=1)
  bsq_B = jnp.where(jnp.arange(b_BxD.shape[0]) < n_valid_rows, bsq_B, jnp.inf)
  return jnp.concatenate([b_BxD, bsq_B[:, None]], axis=1)


def _augment_queries(q_QxD):
  """([-2 q, 1] (Q, D+1), ||q||^2 (Q,)): ||q||^2 + [-2q, 1].[b, ||b||^2] = ||q - b||^2."""
  ones = jnp.ones((q_QxD.shape[0], 1), q_QxD.dtype)
  return jnp.concatenate([-2.0 * q_QxD, ones], axis=1), jnp.sum(q_QxD * q_QxD, axis=1)


_augment_bank_jit = jax.jit(_augment_bank)
_augment_queries_jit = jax.jit(_augment_queries)


def _select_chunks(qsq_Q, e_QxM, kk: int, chunk: int):
  """The kk chunks of `chunk` consecutive columns of e (Q, M) with the smallest distances, in
  column order: (their values (Q, kk * chunk), their columns (Q, kk * chunk)).

  d = max(||q||^2 + e, 0) is non-decreasing in e, so the smallest d of a chunk is d of its
  smallest e: one fast pass (a min over each chunk) and a top-k over M / chunk values. The
  chunks are ranked by d (not e: d clamps, so rows of different e can tie in d), ties to the
  lower chunk, and taken in column order. Exact, ties included: every row of a chunk left out
  is preceded in (distance, column) order by the best rows of the kk chunks chosen, so the
  k <= kk best rows all lie in the chosen chunks, and their order (column order) is kept."""
  q, m = e_QxM.shape
  e_QxCxL = e_QxM.reshape(q, m // chunk, chunk)
  d_min = jnp.maximum(qsq_Q[:, None] + jnp.min(e_QxCxL, axis=2), 0.0) + 0.0
  _, chunk_QxK = jax.lax.top_k(-d_min, kk)
  chunk_QxK = jnp.sort(chunk_QxK, axis=1)                       # column order
  vals = jnp.take_along_axis(e_QxCxL, chunk_QxK[:, :, None], axis=1).reshape(q, kk * chunk)
  cols = (chunk_QxK[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(
      q, kk * chunk)
  return vals, cols


def _selection_levels(nb: int, kk: int) -> tuple[int, ...]:
  """Chunk sizes of the stages of `_block_topk` for a block of nb rows and kk best: ().

  First stage: the largest power-of-two chunk <= 256 that divides nb and leaves >= 4 kk
  chunks; none (a plain top-k over the block) if even 16 does not. Second stage, for
  kk >= 16 (XLA's CPU top-k costs grow with k, ~10-40 ns per element in one thread): chunks of
  16 within the kk first-stage chunks, when those chunks hold >= 4 sub-chunks each. Measured
  at D = 128, k + margin = 58 (CPU, benchmarks/knn.py): a plain top-k of a 16384-row block cost
  ~1.5x the block's matmul; for the 100k-row low-dimension block the two stages give top-k
  inputs of 391, 928 and 58 + 928 values per query row instead of 100096."""
  chunk = _CHUNK
  while chunk >= _SUBCHUNK and (nb % chunk or nb // chunk < 4 * kk):
    chunk //= 2
  if chunk < _SUBCHUNK:
    return ()
  if kk >= 16 and chunk >= 4 * _SUBCHUNK:
    return (chunk, _SUBCHUNK)
  return (chunk,)


def _block_topk(qa_QxA, qsq_Q, ba_BxA, offset, k: int, best=None):
  """The k nearest rows of one augmented bank block (ascending, ties by index): (Q, k) x 2,
  merged with `best` (the running (d, i) of earlier blocks, lower indices) when given.

  A = D + 1 (`_augment_queries`, `_augment_bank`). One matmul per block gives
  e = -2 q.b + ||b||^2 (precision HIGHEST); the distance is d = max(||q||^2 + e, 0), +inf on
  padding rows (their ||b||^2 is +inf). The candidates are narrowed without forming d over
  the whole block by `_select_chunks`, once or twice (`_selection_levels`: chunks of up to
  256 rows, then of 16 within them), and one exact top-k of d over the running best followed
  by the candidates in index order gives the result: equal distances go to the lower index."""
  nb = ba_BxA.shape[0]
  e_QxB = jnp.matmul(qa_QxA, ba_BxA.T, precision=HIGHEST)
  kk = min(k, nb)
  cols = None
  for chunk in _selection_levels(nb, kk):
    e_QxB, c = _select_chunks(qsq_Q, e_QxB, kk, chunk)
    cols = c if cols is None else jnp.take_along_axis(cols, c, axis=1)
  if cols is None:
    cols = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), e_QxB.shape)
  cand_d = jnp.maximum(qsq_Q[:, None] + e_QxB, 0.0) + 0.0          # -0 -> +0
  cand_i = offset + cols.astype(jnp.int32)
  if best is not None:                     # the running best (lower indices) goes first
    cand_d = jnp.concatenate([best[0], cand_d], axis=1)
    cand_i = jnp.concatenate([best[1], cand_i], axis=1)
    kk = k
  neg_d, pos = jax.lax.top_k(-cand_d, kk)              # lower position first among equals
  return -neg_d, jnp.take_along_axis(cand_i, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_merge_block(qa_QxA, qsq_Q, ba_BxA, offset, best_d_QxK, best_i_QxK, *, k):
  """Merges one augmented bank block into the running k best (ascending, ties by index)."""
  return _block_topk(qa_QxA, qsq_Q, ba_BxA, offset, k, best=(best_d_QxK, best_i_QxK))


def rerank_margin(k: int, n: int) -> int:
  """Extra candidates re-ranked exactly beyond the k asked for: max(8, k // 8), within the bank.

  The expansion's error is ~1e-7 (||q||^2 + ||b||^2) (float32 cancellation); a true neighbour
  is lost only if more than `margin` rows fall within that error of the k-th distance."""
  return max(0, min(int(n) - int(k), max(8, int(k) // 8)))


@functools.partial(jax.jit, static_argnames=("k",))
def _exact_rerank(q_SxD, cand_SxJxD, idx_SxJ, *, k):
  """The k best of J candidates by the exact sum_j (q_j - b_j)^2, ties to the lower index."""
  diff = cand_SxJxD - q_SxD[:, None, :]
  d = jnp.sum(diff * diff, axis=2)
  d, i = jax.lax.sort((d, idx_SxJ), dimension=1, num_keys=2)
  return d[:, :k], i[:, :k]


def _rerank_rows(query_block: int, cand: int, dim: int, budget_bytes: int) -> int:
  """Query rows per exact re-rank step: the gathered (rows, cand, dim) block and its
  difference and square (3 copies) fit in the budget; at most the query block."""
  return max(1, min(int(query_block), max(0, int(budget_bytes)) // (12 * cand * max(1, dim))))


def _rerank(q_QxD: np.ndarray, bank_NxD: np.ndarray, idx_QxJ: np.ndarray, k: int,
            rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact re-rank of the candidate rows idx_QxJ of every query (numpy in, numpy out).

  The candidates are gathered from the bank (a host array, or a `DeviceBank`'s device
  blocks), `rows` queries at a time (the last step padded, so one compilation per
  (rows, J, D, k))."""
  q_total = len(q_QxD)
  dists = np.empty((q_total, k), np.float32)
  idx = np.empty((q_total, k), np.int32)
  for start in range(0, q_total, rows):
    stop = min(start + rows, q_total)
    i_sub = _pad_rows(idx_QxJ[start:stop], rows)
    d, i = _exact_rerank(jnp.asarray(_pad_rows(q_QxD[start:stop], rows)),
                         jnp.asarray(bank_NxD[i_sub]), jnp.asarray(i_sub), k=k)
    dists[start:stop] = np.asarray(d)[:stop - start]
    idx[start:stop] = np.asarray(i)[:stop - start]
  return dists, idx


def padded_query_block(query_block: int, q_total: int) -> int:
  """The query rows of one search step: `query_block`, or for fewer queries than that the
  next power of two >= q_total (at least 8), so that sets of nearby sizes share one
  compilation instead of one each."""
  qb = max(1, int(query_block))
  if q_total < qb:
    qb = min(qb, max(8, 1 << max(0, int(q_total) - 1).bit_length()))
  return qb


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


class DeviceBank:
  """An (N, D) bank placed on the default device once, in augmented blocks ([b, ||b||^2],
  padding rows +inf), for repeated `knn_search` calls. Made by `put_bank`. It is the one copy
  of the bank: no host array is kept; the exact re-rank gathers its candidate rows from the
  device blocks (`bank[idx]`, an integer index array), and `np.asarray(bank)` reads every row
  back (a temporary host copy, for callers that want the array)."""

  ndim = 2
  dtype = np.dtype(np.float32)

  def __init__(self, blocks, bank_block: int, query_block: int, budget: int, n: int, dim: int):
    self.blocks, self.bank_block = blocks, bank_block
    self.query_block, self.budget = query_block, budget
    self.n, self.dim = int(n), int(dim)

  def __len__(self) -> int:
    return self.n

  @property
  def shape(self) -> tuple[int, int]:
    return (self.n, self.dim)

  def __getitem__(self, idx):
    """Rows `idx` as numpy float32 idx.shape + (D,), gathered from the device blocks (an
    integer index array); any other key reads the whole bank back first."""
    if idx is None or isinstance(idx, (slice, tuple)):
      return np.asarray(self)[idx]
    idx = np.asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):
      return np.asarray(self)[idx]
    flat = idx.reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + self.n, flat)
    if flat.size and (flat.min() < 0 or flat.max() >= self.n):
      raise IndexError(f"DeviceBank: index out of range for {self.n} rows")
    out = np.empty((flat.size, self.dim), np.float32)
    blk = flat // self.bank_block
    order = np.argsort(blk, kind="stable")
    bounds = np.searchsorted(blk[order], np.arange(len(self.blocks) + 1))
    for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      if hi == lo:
        continue
      sel = order[lo:hi]
      local = (flat[sel] - j * self.bank_block).astype(np.int32)
      size = max(8, 1 << (len(local) - 1).bit_length())       # few compilations
      rows = _take_rows(self.blocks[j][0], jnp.asarray(_pad_rows(local, size)), dim=self.dim)
      out[sel] = np.asarray(rows)[:len(local)]
    return out.reshape(idx.shape + (self.dim,))

  def __array__(self, dtype=None, copy=None):
    out = np.concatenate([np.asarray(b)[:, :self.dim] for b, _ in self.blocks])[:self.n]
    return out if dtype is None else out.astype(dtype)


@functools.partial(jax.jit, static_argnames=("dim",))
def _take_rows(block_BxA, rows_R, *, dim: int):
  return block_BxA[rows_R, :dim]


def _check_bank(bank_NxD, k: int, name: str = "knn_search") -> np.ndarray:
  bank_NxD = np.asarray(bank_NxD, np.float32)
  if bank_NxD.ndim != 2:
    raise DetectorError(f"{name}: bank {bank_NxD.shape} must be (N, D)")
  if not 1 <= int(k) <= bank_NxD.shape[0]:
    raise DetectorError(f"{name}: k={int(k)} needs 1 <= k <= bank size ({bank_NxD.shape[0]})")
  return bank_NxD


def _check_lazy_bank(bank_NxD, k: int, name: str):
  shape = tuple(getattr(bank_NxD, "shape", ()))
  if len(shape) != 2 or not hasattr(bank_NxD, "__getitem__"):
    raise DetectorError(f"{name}: bank {shape} must be (N, D)")
  if not 1 <= int(k) <= shape[0]:
    raise DetectorError(f"{name}: k={int(k)} needs 1 <= k <= bank size ({shape[0]})")
  return bank_NxD


def put_bank(bank_NxD, k: int = 1, *, query_block: int | None = None,
             bank_block: int | None = None, memory_budget: int | None = None,
             exact: bool = True):
  """Places a bank for repeated `knn_search(queries, bank, k')` calls with k' <= `k`: a
  `DeviceBank` (one device) or, inside `parallel.data_parallel` with several devices, a
  `ShardedBank` split over the mesh. Block sizes as in `knn_search` for query blocks of
  `query_block` rows (default 1024) and the k + re-rank margin candidates of `k`.

  `bank_NxD` may also be a lazy (N, D) source with `.shape` and row slicing that returns
  numpy (a memory map, `features.Rows`, rows computed on demand): on one device it is read one
  bank block at a time straight into the device blocks, so no host copy of the whole bank
  exists at any time (on a mesh it is read whole first)."""
  mesh = parallel.active_mesh()
  lazy = mesh is None and not isinstance(bank_NxD, (np.ndarray, jax.Array, list, tuple))
  bank_NxD = _check_lazy_bank(bank_NxD, k, "put_bank") if lazy else _check_bank(bank_NxD, k,
                                                                                 "put_bank")
  if mesh is not None:
    return shard_bank(bank_NxD, mesh, bank_block=bank_block,
                      query_block=_MAX_QUERY_BLOCK if query_block is None else int(query_block),
                      k=k, memory_budget=memory_budget)
  n, d = bank_NxD.shape
  budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
  kc = int(k) + rerank_margin(int(k), n) if exact else int(k)
  qb = _MAX_QUERY_BLOCK if query_block is None else int(query_block)
  if bank_block is None:
    qb_auto, bank_block = block_sizes_for_budget(qb, n, d, kc, budget)
    qb = min(qb, qb_auto)
  return _place_blocks(bank_NxD, int(bank_block), qb, budget)


def _place_blocks(bank_NxD: np.ndarray, bank_block: int, query_block: int,
                  budget: int) -> DeviceBank:
  n = bank_NxD.shape[0]
  bb = max(1, int(bank_block))
  if bb > n:                          # one block: pad only up to a whole chunk, if at all
    bb = n if n < _CHUNK or bb % _CHUNK else -(-n // _CHUNK) * _CHUNK
  blocks = []
  for start in range(0, n, bb):
    b = jnp.asarray(_pad_rows(np.asarray(bank_NxD[start:start + bb], np.float32), bb))
    blocks.append((_augment_bank_jit(b, n - start), jnp.int32(start)))
    del b
  return DeviceBank(blocks, bb, max(1, int(query_block)), budget, n, bank_NxD.shape[1])


def knn_search(queries_QxD, bank_NxD, k: int, *, query_block: int | None = None,
               bank_block: int | None = None, memory_budget: int | None = None,
               exact: bool = True,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest bank rows of every query under the squared L2 distance.

  Returns (dists_sq_QxK ascending, idx_QxK) as numpy float32 / int32. Equal distances are
  ordered by the lower bank index. Memory is bounded by the blocks: queries go through in
  blocks of `query_block` rows and the bank in blocks of `bank_block` rows (the last of each
  padded, padding masked with +inf so it is never returned); a block size left out is chosen
  by `block_sizes_for_budget` for `memory_budget` bytes (default 512 MiB). Distances are
  ||q||^2 - 2 q.b + ||b||^2 with one matmul per block at precision HIGHEST, clamped at 0;
  ||b||^2 is computed once per bank block. With `exact` (default) the search keeps the best
  k + `rerank_margin(k, N)` candidates and re-ranks them by the exact difference
  sum_j (q_j - b_j)^2 (candidate rows gathered from the bank in steps bounded by the same
  budget), so the returned distances are direct ones and near-ties are ordered as sklearn
  orders them; `exact=False` returns the expansion's top k. The bank is put on the device once,
  block by block (one copy); one compilation per (block shapes, k): a query set smaller than
  the query block is padded up to a power of two (`padded_query_block`), so sets of different
  sizes share compilations. `progress(n)` is called with the number of queries done after each
  query block.
  `bank_NxD` may also be a bank placed once by `put_bank` (a `DeviceBank`, or a `ShardedBank`
  on a mesh) and reused across calls: e.g. queries that arrive chunk by chunk search the same
  device copy, and nothing of size N x D goes to the device again.
  Raises DetectorError (a ValueError) unless 1 <= k <= N. Inside `parallel.data_parallel`
  with several devices the bank is split over them (`sharded_knn_search`, same result).
  """
  if isinstance(bank_NxD, ShardedBank):
    return sharded_knn_search(queries_QxD, bank_NxD, k, bank_NxD.mesh, query_block=query_block,
                              memory_budget=memory_budget, exact=exact, progress=progress)
  if parallel.active_mesh() is not None and not isinstance(bank_NxD, DeviceBank):
    return sharded_knn_search(queries_QxD, bank_NxD, k, parallel.active_mesh(),
                              query_block=query_block, bank_block=bank_block,
                              memory_budget=memory_budget, exact=exact, progress=progress)
  queries_QxD = np.asarray(queries_QxD, np.float32)
  k = int(k)
  placed = bank_NxD if isinstance(bank_NxD, DeviceBank) else None
  host = placed if placed is not None else np.asarray(bank_NxD, np.float32)   # re-rank rows
  if queries_QxD.ndim != 2 or host.ndim != 2 or queries_QxD.shape[1] != host.shape[1]:
    raise DetectorError(f"knn_search: queries {queries_QxD.shape} and bank {host.shape} "
                        "must be (Q, D) and (N, D)")
  n, q_total = host.shape[0], queries_QxD.shape[0]
  if not 1 <= k <= n:
    raise DetectorError(f"knn_search: k={k} needs 1 <= k <= bank size ({n})")
  if q_total == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  kc = k + rerank_margin(k, n) if exact else k       # candidates kept by the block search
  if placed is None:
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if query_block is None or bank_block is None:
      auto_qb, auto_bb = block_sizes_for_budget(padded_query_block(_MAX_QUERY_BLOCK, q_total),
                                                n, host.shape[1], kc, budget)
      query_block = auto_qb if query_block is None else query_block
      bank_block = auto_bb if bank_block is None else bank_block
    placed = _place_blocks(host, int(bank_block), int(query_block), budget)
  else:
    budget = placed.budget if memory_budget is None else memory_budget
    query_block = placed.query_block if query_block is None else query_block
  qb = padded_query_block(query_block, q_total)
  dists = np.empty((q_total, kc), np.float32)
  idx = np.empty((q_total, kc), np.int32)
  for start in range(0, q_total, qb):
    stop = min(start + qb, q_total)
    qa, qsq = _augment_queries_jit(jnp.asarray(_pad_rows(queries_QxD[start:stop], qb)))
    best_d = jnp.full((qb, kc), jnp.inf, jnp.float32)
    best_i = jnp.full((qb, kc), -1, jnp.int32)
    for ba, offset in placed.blocks:
      best_d, best_i = _knn_merge_block(qa, qsq, ba, offset, best_d, best_i, k=kc)
    dists[start:stop] = np.asarray(best_d)[:stop - start]
    idx[start:stop] = np.asarray(best_i)[:stop - start]
    if progress is not None:
      progress(stop - start)
  if not exact:
    return dists, idx
  return _rerank(queries_QxD, host, idx, k, _rerank_rows(qb, kc, host.shape[1], budget))


# ------------------------------------------------------------------ sharded exact search


def _local_layout(n: int, n_dev: int, bank_block: int) -> tuple[int, int]:
  """(rows per bank block, blocks per device) covering ceil(n / n_dev) rows per device."""
  per_dev = -(-n // n_dev)
  bb = max(1, int(bank_block))
  if bb >= per_dev:                                 # one block per device
    chunk = _CHUNK
    bb = per_dev if per_dev < chunk or bb % chunk else -(-per_dev // chunk) * chunk
  return bb, -(-per_dev // bb)


@functools.lru_cache(maxsize=64)
def _sharded_search_fn(mesh, axis: str, k: int, bb: int, n_blocks: int):
  """jit(shard_map(local blocked top-k -> all_gather -> final top-k)) for one layout."""
  n_local = bb * n_blocks

  def local(qa_QxA, qsq_Q, ba_LxA):
    first = jax.lax.axis_index(axis).astype(jnp.int32) * n_local     # global row of local 0
    blocks_NbxBxA = ba_LxA.reshape(n_blocks, bb, ba_LxA.shape[1])
    q = qa_QxA.shape[0]
    init = (jnp.full((q, k), jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))
    init = jax.lax.pcast(init, (axis,), to="varying")   # the carry differs per device

    def body(best, xs):
      block_BxA, j = xs
      return _block_topk(qa_QxA, qsq_Q, block_BxA, first + j * bb, k, best=best), None

    (best_d, best_i), _ = jax.lax.scan(body, init,
                                       (blocks_NbxBxA, jnp.arange(n_blocks, dtype=jnp.int32)))
    # (Q, n_dev * k), device-major: candidates in global-index order across devices.
    all_d = jax.lax.all_gather(best_d, axis, axis=1, tiled=True, to="invarying")
    all_i = jax.lax.all_gather(best_i, axis, axis=1, tiled=True, to="invarying")
    neg_d, pos = jax.lax.top_k(-all_d, k)            # lower position (index) first on ties
    return -neg_d, jnp.take_along_axis(all_i, pos, axis=1)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=(P(), P()))
  return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _augment_sharded_fn(mesh, axis: str):
  out = NamedSharding(mesh, P(axis))
  return jax.jit(_augment_bank, out_shardings=out)


def shard_bank(bank_NxD, mesh, *, axis: str | None = None, bank_block: int | None = None,
               query_block: int = 1024, k: int = 1, memory_budget: int | None = None):
  """Puts the bank on the mesh for `sharded_knn_search`; returns a reusable `ShardedBank`."""
  axis = parallel.mesh_axis(mesh, axis)
  bank_NxD = np.asarray(bank_NxD, np.float32)
  if bank_NxD.ndim != 2 or bank_NxD.shape[0] == 0:
    raise ValueError(f"shard_bank: bank must be (N, D) with N >= 1, got {bank_NxD.shape}")
  n, d = bank_NxD.shape
  n_dev = mesh.shape[axis]
  if bank_block is None:
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    _, bank_block = block_sizes_for_budget(query_block, -(-n // n_dev), d, k, budget)
  bb, n_blocks = _local_layout(n, n_dev, bank_block)
  rows = n_dev * bb * n_blocks
  padded = bank_NxD if rows == n else np.concatenate(
      [bank_NxD, np.zeros((rows - n, d), np.float32)])
  # several processes: each places its own devices' rows (no all-process equality check)
  placed = parallel.put_global(padded, NamedSharding(mesh, P(axis)))
  del padded
  return ShardedBank(_augment_sharded_fn(mesh, axis)(placed, n), n, d, bb, n_blocks, mesh,
                     axis, host_NxD=bank_NxD)


class ShardedBank:
  """An augmented bank ([b, ||b||^2], +inf on padding rows) split over a mesh axis, and a
  reference to the host bank (N, D) float32 that the exact re-rank gathers candidates from."""

  def __init__(self, aug_RxA, n, dim, bank_block, n_blocks, mesh, axis, host_NxD=None):
    self.aug_RxA, self.n, self.dim, self.host_NxD = aug_RxA, n, dim, host_NxD
    self.bank_block, self.n_blocks, self.mesh, self.axis = bank_block, n_blocks, mesh, axis

  def __len__(self) -> int:
    return self.n


def sharded_knn_search(queries_QxD, bank, k: int, mesh, *, axis: str | None = None,
                       query_block: int | None = None, bank_block: int | None = None,
                       memory_budget: int | None = None, exact: bool = True,
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest bank rows over a device mesh; same contract as `knn_search`.

  `bank` is an (N, D) array or a `ShardedBank` from `shard_bank` (reuse it across calls).
  Returns numpy (dists_sq_QxK ascending, idx_QxK); equal distances go to the lowest global
  index. Queries are replicated and go through in blocks of `query_block` (the last padded);
  each device holds only its slice of the bank and a (query_block x bank_block) distance block.
  With `exact` the k + margin candidates are re-ranked exactly as in `knn_search` (on the
  default device, from the host bank), so both give the same result.
  """
  axis = parallel.mesh_axis(mesh, axis)
  queries_QxD = np.asarray(queries_QxD, np.float32)
  k = int(k)
  q_total = queries_QxD.shape[0] if queries_QxD.ndim == 2 else -1
  if not isinstance(bank, ShardedBank):
    n_rows = np.shape(bank)[0] if np.ndim(bank) == 2 else 0
    qb_for_bank = 1024 if query_block is None else int(query_block)
    if 1 <= k <= n_rows:
      bank = shard_bank(bank, mesh, axis=axis, bank_block=bank_block, query_block=qb_for_bank,
                        k=k, memory_budget=memory_budget)
    else:
      raise DetectorError(f"sharded_knn_search: k={k} needs 1 <= k <= bank size "
                                  f"({n_rows}), bank (N, D)")
  if queries_QxD.ndim != 2 or queries_QxD.shape[1] != bank.dim:
    raise DetectorError(f"sharded_knn_search: queries {queries_QxD.shape} must be "
                                f"(Q, {bank.dim})")
  if not 1 <= k <= bank.n:
    raise DetectorError(f"sharded_knn_search: k={k} needs 1 <= k <= bank size "
                                f"({bank.n})")
  if q_total == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  exact = bool(exact) and bank.host_NxD is not None
  kc = k + rerank_margin(k, bank.n) if exact else k
  budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
  if query_block is None:
    query_block, _ = block_sizes_for_budget(padded_query_block(_MAX_QUERY_BLOCK, q_total),
                                            bank.bank_block, bank.dim, kc, budget)
  qb = padded_query_block(query_block, q_total)
  fn = _sharded_search_fn(bank.mesh, bank.axis, kc, bank.bank_block, bank.n_blocks)
  repl = NamedSharding(bank.mesh, P())
  dists = np.empty((q_total, kc), np.float32)
  idx = np.empty((q_total, kc), np.int32)
  for start in range(0, q_total, qb):
    stop = min(start + qb, q_total)
    q = parallel.put_global(_pad_rows(queries_QxD[start:stop], qb), repl)
    qa, qsq = _augment_queries_jit(q)
    best_d, best_i = fn(qa, qsq, bank.aug_RxA)
    dists[start:stop] = np.asarray(best_d)[:stop - start]
    idx[start:stop] = np.asarray(best_i)[:stop - start]
    if progress is not None:
      progress(stop - start)
  if not exact:
    return dists, idx
  return _rerank(queries_QxD, bank.host_NxD, idx, k, _rerank_rows(qb, kc, bank.dim, budget))
