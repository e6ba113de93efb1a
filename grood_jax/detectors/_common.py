"""Helpers shared by the baseline detectors (and GROOD's search).

- `knn_search`: exact, blocked k-nearest-neighbour search in jnp; `l2_normalize`.
- `head_affine`: the final layer of any backbone as (W_CxD, b_C), read off `fns.head`.
- jnp pieces used inside the detectors' jitted scores: `energy`, `max_softmax`, `affine`.
- `as_np32`, `require_labels`: conversions and checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax.detectors.base import Context, DetectorError, Split

HIGHEST = jax.lax.Precision.HIGHEST


def as_np32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def require_labels(split: Split, who: str) -> np.ndarray:
  if split.labels is None:
    raise DetectorError(f"{who} needs the true labels of {split.name!r}")
  return np.asarray(split.labels, np.int32)


# ------------------------------------------------------------------ nearest neighbours


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_merge_block(q_QxD, qsq_Q, b_BxD, bsq_B, offset, n_valid, best_d_QxK, best_i_QxK,
                     *, k):
  """Merges one bank block into the running k best (distances ascending, ties by index)."""
  d_QxB = qsq_Q[:, None] - 2.0 * jnp.matmul(q_QxD, b_BxD.T, precision=HIGHEST) + bsq_B[None, :]
  d_QxB = jnp.maximum(d_QxB, 0.0) + 0.0           # clamp rounding below 0; -0.0 -> +0.0
  idx_B = offset + jnp.arange(b_BxD.shape[0], dtype=jnp.int32)
  d_QxB = jnp.where(idx_B[None, :] < n_valid, d_QxB, jnp.inf)   # padding rows never win
  # The running best (all from earlier blocks, so lower indices) goes first: lax.top_k keeps
  # the lower position among equal values, so ties resolve to the lowest bank index.
  cand_d = jnp.concatenate([best_d_QxK, d_QxB], axis=1)
  cand_i = jnp.concatenate([best_i_QxK, jnp.broadcast_to(idx_B, d_QxB.shape)], axis=1)
  neg_d, pos = jax.lax.top_k(-cand_d, k)
  return -neg_d, jnp.take_along_axis(cand_i, pos, axis=1)


@jax.jit
def _sq_norms(x_NxD):
  return jnp.sum(x_NxD * x_NxD, axis=1)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


def knn_search(queries_QxD, bank_NxD, k: int, *, query_block: int = 1024,
               bank_block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest bank rows of every query under the squared L2 distance.

  Returns (dists_sq_QxK ascending, idx_QxK) as numpy float32 / int32. Equal distances are
  ordered by the lower bank index. Memory is bounded by the blocks: queries go through in
  blocks of `query_block` rows and the bank in blocks of `bank_block` rows (the last of each
  padded, padding masked with +inf so it is never returned); distances are
  ||q||^2 - 2 q.b + ||b||^2 with the matmul at precision HIGHEST, clamped at 0. The bank is
  put on the device once, block by block (one copy); one compilation per (block shapes, k).
  Raises DetectorError (a ValueError) unless 1 <= k <= N.
  """
  queries_QxD = np.asarray(queries_QxD, np.float32)
  bank_NxD = np.asarray(bank_NxD, np.float32)
  if queries_QxD.ndim != 2 or bank_NxD.ndim != 2 or queries_QxD.shape[1] != bank_NxD.shape[1]:
    raise DetectorError(f"knn_search: queries {queries_QxD.shape} and bank {bank_NxD.shape} "
                        "must be (Q, D) and (N, D)")
  n, q_total = bank_NxD.shape[0], queries_QxD.shape[0]
  k = int(k)
  if not 1 <= k <= n:
    raise DetectorError(f"knn_search: k={k} needs 1 <= k <= bank size ({n})")
  if q_total == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  bb = max(1, min(int(bank_block), n))
  qb = max(1, min(int(query_block), q_total))
  blocks = []
  for start in range(0, n, bb):
    b = jnp.asarray(_pad_rows(bank_NxD[start:start + bb], bb))
    blocks.append((b, _sq_norms(b), jnp.int32(start)))
  n_valid = jnp.int32(n)
  dists = np.empty((q_total, k), np.float32)
  idx = np.empty((q_total, k), np.int32)
  for start in range(0, q_total, qb):
    stop = min(start + qb, q_total)
    q = jnp.asarray(_pad_rows(queries_QxD[start:stop], qb))
    qsq = _sq_norms(q)
    best_d = jnp.full((qb, k), jnp.inf, jnp.float32)
    best_i = jnp.full((qb, k), -1, jnp.int32)
    for b, bsq, offset in blocks:
      best_d, best_i = _knn_merge_block(q, qsq, b, bsq, offset, n_valid, best_d, best_i, k=k)
    dists[start:stop] = np.asarray(best_d)[:stop - start]
    idx[start:stop] = np.asarray(best_i)[:stop - start]
  return dists, idx


def l2_normalize(x_NxD, eps: float = 1e-12):
  """Rows divided by their L2 norm (rows of norm 0 stay 0)."""
  x_NxD = jnp.asarray(x_NxD, jnp.float32)
  return x_NxD / jnp.maximum(jnp.linalg.norm(x_NxD, axis=1, keepdims=True), eps)


# ------------------------------------------------------------------ the final layer


def head_affine(ctx: Context, who: str = "detector") -> tuple[np.ndarray, np.ndarray]:
  """The final layer as numpy float32 (W_CxD, b_C), so that f = W h + b.

  Read off `ctx.fns.head` (b = head(0), rows of W from head(e_i) - b), so it works for any
  backbone whose head is affine, whatever its parameter layout (a flax kernel is (D, C)).
  Checked on a few training features; a non-affine head raises DetectorError.
  """
  d = int(ctx.train.feats.shape[1])
  with jax.default_matmul_precision("highest"):
    b_C = np.asarray(ctx.fns.head(ctx.params, jnp.zeros((1, d), jnp.float32)), np.float64)[0]
    w_DxC = np.asarray(ctx.fns.head(ctx.params, jnp.eye(d, dtype=jnp.float32)),
                       np.float64) - b_C
    h = jnp.asarray(ctx.train.feats[:8], jnp.float32)
    f = np.asarray(ctx.fns.head(ctx.params, h), np.float64)
  f_lin = np.asarray(h, np.float64) @ w_DxC + b_C
  scale = max(1.0, float(np.abs(f).max()))
  if not np.allclose(f, f_lin, rtol=1e-3, atol=1e-3 * scale):
    raise DetectorError(f"{who} needs an affine final layer f = W h + b; this model's head is "
                        "not affine")
  return w_DxC.T.astype(np.float32), b_C.astype(np.float32)


# ------------------------------------------------------------------ score pieces


def energy(logits_NxC, temperature=1.0):
  """T * logsumexp(f / T)."""
  return temperature * jax.nn.logsumexp(logits_NxC / temperature, axis=-1)


def max_softmax(logits_NxC, temperature=1.0):
  return jnp.max(jax.nn.softmax(logits_NxC / temperature, axis=-1), axis=-1)


def affine(h_NxD, w_CxD, b_C):
  return jnp.matmul(h_NxD, w_CxD.T, precision=HIGHEST) + b_C
