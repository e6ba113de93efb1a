"""Multi-device pieces: a 1-D device mesh, sharded exact search, sharded batches, and a
data-parallel train step.

All of it works unchanged on one device (a mesh of size 1), so callers need no branch.

- `make_mesh(axis="data")`: every device (or the given ones) on one mesh axis, Auto axis type
  (shardings are annotations that XLA propagates; nothing in the types).
- `sharded_knn_search(queries, bank, k, mesh)`: the bank is split row-wise over the mesh axis
  (NamedSharding, padded to a multiple of the device count with rows whose distance is +inf,
  so they are never returned); inside `jax.shard_map` every device scans its slice in bank
  blocks with the same block top-k as `detectors._common.knn_search`, then the local k best
  (with global indices) are all-gathered and merged by a final top-k. Device r holds the rows
  [r * n_local, (r + 1) * n_local), so the gathered candidates are in global-index order and
  equal distances resolve to the lowest global index, exactly as on one device.
- `shard_batch(x, mesh)`, `replicate(tree, mesh)`: put a batch (leading axis split over the
  mesh) or parameters (a full copy per device) on the mesh.
- `make_dp_train_step(loss_fn, optimizer, mesh)`: optax-style data-parallel step, params and
  optimizer state replicated, batch sharded; XLA inserts the gradient all-reduce, so the
  result equals the single-device step up to float summation order.
  `make_dp_nnx_train_step(graphdef, loss_fn, mesh)`: the training loop's own step
  (`training.train_state.make_train_step(..., mesh=mesh)`, what train.py runs).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from grood_jax.detectors import _common
from grood_jax.parallel import global_batch, make_mesh, replicate  # noqa: F401  (API)

# ------------------------------------------------------------------ mesh and placement


def _axis(mesh, axis: str | None) -> str:
  axis = mesh.axis_names[0] if axis is None else axis
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {axis!r} (axes: {mesh.axis_names})")
  return axis


def shard_batch(tree, mesh, axis: str | None = None):
  """Every leaf's leading axis split over the mesh axis (`parallel.global_batch` per leaf; it
  must divide by the device count). Pad the batch first (`features.pad_batch`) if needed."""
  axis = _axis(mesh, axis)
  n_dev = mesh.shape[axis]
  for leaf in jax.tree.leaves(tree):
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n_dev:
      raise ValueError(f"shard_batch: leading axis of shape {np.shape(leaf)} is not a multiple "
                       f"of the {n_dev} devices on mesh axis {axis!r}; pad the batch first")
  return jax.tree.map(lambda leaf: global_batch(leaf, mesh, axis), tree)


# ------------------------------------------------------------------ sharded exact search


def _local_layout(n: int, n_dev: int, bank_block: int) -> tuple[int, int]:
  """(rows per bank block, blocks per device) covering ceil(n / n_dev) rows per device."""
  per_dev = -(-n // n_dev)
  bb = max(1, int(bank_block))
  if bb >= per_dev:                                 # one block per device
    chunk = _common._CHUNK
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
      d, i = _common._block_topk(qa_QxA, qsq_Q, block_BxA, first + j * bb, k)
      return _common._merge_topk(*best, d, i, k), None

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
  return jax.jit(_common._augment_bank, out_shardings=out)


def shard_bank(bank_NxD, mesh, *, axis: str | None = None, bank_block: int | None = None,
               query_block: int = 1024, k: int = 1, memory_budget: int | None = None):
  """Puts the bank on the mesh for `sharded_knn_search`; returns a reusable `ShardedBank`."""
  axis = _axis(mesh, axis)
  bank_NxD = np.asarray(bank_NxD, np.float32)
  if bank_NxD.ndim != 2 or bank_NxD.shape[0] == 0:
    raise ValueError(f"shard_bank: bank must be (N, D) with N >= 1, got {bank_NxD.shape}")
  n, d = bank_NxD.shape
  n_dev = mesh.shape[axis]
  if bank_block is None:
    budget = _common.DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    _, bank_block = _common.block_sizes_for_budget(query_block, -(-n // n_dev), d, k, budget)
  bb, n_blocks = _local_layout(n, n_dev, bank_block)
  rows = n_dev * bb * n_blocks
  padded = bank_NxD if rows == n else np.concatenate(
      [bank_NxD, np.zeros((rows - n, d), np.float32)])
  placed = jax.device_put(padded, NamedSharding(mesh, P(axis)))
  del padded
  return ShardedBank(_augment_sharded_fn(mesh, axis)(placed, n), n, d, bb, n_blocks, mesh,
                     axis)


class ShardedBank:
  """An augmented bank ([b, ||b||^2], +inf on padding rows) split over a mesh axis."""

  def __init__(self, aug_RxA, n, dim, bank_block, n_blocks, mesh, axis):
    self.aug_RxA, self.n, self.dim = aug_RxA, n, dim
    self.bank_block, self.n_blocks, self.mesh, self.axis = bank_block, n_blocks, mesh, axis


def sharded_knn_search(queries_QxD, bank, k: int, mesh, *, axis: str | None = None,
                       query_block: int | None = None, bank_block: int | None = None,
                       memory_budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest bank rows over a device mesh; same contract as `knn_search`.

  `bank` is an (N, D) array or a `ShardedBank` from `shard_bank` (reuse it across calls).
  Returns numpy (dists_sq_QxK ascending, idx_QxK); equal distances go to the lowest global
  index. Queries are replicated and go through in blocks of `query_block` (the last padded);
  each device holds only its slice of the bank and a (query_block x bank_block) distance block.
  """
  axis = _axis(mesh, axis)
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
      raise _common.DetectorError(f"sharded_knn_search: k={k} needs 1 <= k <= bank size "
                                  f"({n_rows}), bank (N, D)")
  if queries_QxD.ndim != 2 or queries_QxD.shape[1] != bank.dim:
    raise _common.DetectorError(f"sharded_knn_search: queries {queries_QxD.shape} must be "
                                f"(Q, {bank.dim})")
  if not 1 <= k <= bank.n:
    raise _common.DetectorError(f"sharded_knn_search: k={k} needs 1 <= k <= bank size "
                                f"({bank.n})")
  if q_total == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  if query_block is None:
    budget = _common.DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    query_block, _ = _common.block_sizes_for_budget(q_total, bank.bank_block, bank.dim, k,
                                                    budget)
  qb = max(1, min(int(query_block), q_total))
  fn = _sharded_search_fn(bank.mesh, bank.axis, k, bank.bank_block, bank.n_blocks)
  repl = NamedSharding(bank.mesh, P())
  dists = np.empty((q_total, k), np.float32)
  idx = np.empty((q_total, k), np.int32)
  for start in range(0, q_total, qb):
    stop = min(start + qb, q_total)
    q = jax.device_put(_common._pad_rows(queries_QxD[start:stop], qb), repl)
    qa, qsq = _common._augment_queries_jit(q)
    best_d, best_i = fn(qa, qsq, bank.aug_RxA)
    dists[start:stop] = np.asarray(best_d)[:stop - start]
    idx[start:stop] = np.asarray(best_i)[:stop - start]
  return dists, idx


# ------------------------------------------------------------------ data-parallel training


def make_dp_train_step(loss_fn: Callable, optimizer, mesh=None, *, axis: str | None = None,
                       donate: bool = True):
  """Data-parallel optax step: `step(params, opt_state, x, y) -> (params, opt_state, loss, aux)`.

  `loss_fn(params, x, y) -> (loss, aux)` (loss a scalar mean over the batch); `optimizer` an
  `optax.GradientTransformation`. Params and optimizer state are replicated over the mesh
  (default: `make_mesh()` over all devices), x and y split on their leading axis (a multiple
  of the device count). One jit; the gradient all-reduce comes from the sharding annotations.
  """
  import optax

  mesh = make_mesh() if mesh is None else mesh
  axis = _axis(mesh, axis)
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(axis))

  def step(params, opt_state, x, y):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    grads = jax.lax.with_sharding_constraint(grads, repl)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (jax.lax.with_sharding_constraint(params, repl),
            jax.lax.with_sharding_constraint(opt_state, repl), loss, aux)

  jitted = jax.jit(step, in_shardings=(repl, repl, data, data),
                   donate_argnums=(0, 1) if donate else ())

  def run(params, opt_state, x, y):
    return jitted(params, opt_state, x, y)

  run.jitted = jitted
  run.mesh = mesh
  return run


def make_dp_nnx_train_step(graphdef, loss_fn: Callable, mesh=None, **kwargs):
  """`training.train_state.make_train_step(graphdef, loss_fn, mesh=mesh)` (default mesh: all
  devices): the training loop's own step, data-parallel. Replicate the state first."""
  from grood_jax.training.train_state import make_train_step

  return make_train_step(graphdef, loss_fn, mesh=make_mesh() if mesh is None else mesh,
                         **kwargs)


def tree_allclose(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
  """True when every leaf of two pytrees agrees to tolerance (for tests and benchmarks)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))
