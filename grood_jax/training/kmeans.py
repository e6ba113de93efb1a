"""K-means and GReg+'s energy-based outlier sampling, in jnp, jitted, static shapes.

`kmeans(x_NxD, k, key, iters=20)` — greedy k-means++ seeding (first centre uniform, then at
each step 2 + ⌊ln k⌋ candidates drawn with probability ∝ squared distance to the nearest chosen
centre — uniform if every distance is 0 — keeping the candidate with the lowest potential), then
`iters` Lloyd steps. An empty cluster is re-seeded deterministically at the points farthest
from their current centre: the e-th empty cluster (in cluster order) takes the e-th farthest
point. Returns (centroids_KxD, assign_N, inertia) where assign/inertia are those of the final
centroids. Distances are ‖x‖² − 2x·c + ‖c‖² (matmul at HIGHEST precision), clamped at 0.

`energy_based_sample(feats_NxD, energies_N, batch, k, key)` — GReg+ (METHOD.md §2): k-means
of the (L2-normalised) candidate features into k clusters; from each non-empty cluster take its
lowest- and highest-energy member (one sample when they coincide, e.g. a cluster of one); fill
the rest of the batch uniformly at random, without replacement, from the candidates not taken.
Returns `batch` distinct indices into the pool: the cluster minima first, then the maxima, then
the random fill (if 2k > batch the list is cut, keeping every minimum before any maximum).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from grood_jax.ops import pairwise_sq_dists

HIGHEST = jax.lax.Precision.HIGHEST


sq_dists = pairwise_sq_dists          # squared Euclidean distances (N, K), clamped at 0


def _kmeans_pp(x_NxD, k, key):
  """Greedy k-means++ (as scikit-learn): each step draws 2 + ⌊ln k⌋ candidates ∝ d² and keeps
  the one that lowers the potential Σ d² most."""
  n = x_NxD.shape[0]
  trials = 2 + int(math.log(k))
  k0, key = jax.random.split(key)
  first = jax.random.randint(k0, (), 0, n)
  c = jnp.zeros((k, x_NxD.shape[1]), x_NxD.dtype).at[0].set(x_NxD[first])
  d2 = sq_dists(x_NxD, x_NxD[first][None])[:, 0]

  def body(i, carry):
    c, d2, key = carry
    key, sub = jax.random.split(key)
    total = jnp.sum(d2)
    p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), 1.0 / n)
    cand_T = jax.random.choice(sub, n, (trials,), p=p)
    d2_NxT = jnp.minimum(d2[:, None], sq_dists(x_NxD, x_NxD[cand_T]))
    best = jnp.argmin(jnp.sum(d2_NxT, axis=0))
    c = c.at[i].set(x_NxD[cand_T[best]])
    return c, d2_NxT[:, best], key

  c, _, _ = jax.lax.fori_loop(1, k, body, (c, d2, key))
  return c


def _assign(x_NxD, c_KxD):
  d = sq_dists(x_NxD, c_KxD)
  a = jnp.argmin(d, axis=1)
  return a, jnp.take_along_axis(d, a[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(x_NxD, k: int, key, iters: int = 20):
  """(centroids_KxD, assign_N int32, inertia): k-means++ then Lloyd (see module docstring)."""
  x_NxD = jnp.asarray(x_NxD)
  n = x_NxD.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"kmeans: k={k} needs 1 <= k <= N ({n})")
  c = _kmeans_pp(x_NxD, k, key)

  def lloyd(c, _):
    a, dmin = _assign(x_NxD, c)
    sums = jax.ops.segment_sum(x_NxD, a, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones((n,), x_NxD.dtype), a, num_segments=k)
    new = sums / jnp.maximum(counts, 1.0)[:, None]
    empty = counts == 0
    _, far = jax.lax.top_k(dmin, k)                   # farthest points, descending
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
    new = jnp.where(empty[:, None], x_NxD[far[rank]], new)
    return new, None

  c, _ = jax.lax.scan(lloyd, c, None, length=iters)
  a, dmin = _assign(x_NxD, c)
  return c, a.astype(jnp.int32), jnp.sum(dmin)


@functools.partial(jax.jit, static_argnames=("batch", "k", "iters", "with_assign"))
def energy_based_sample(feats_NxD, energies_N, batch: int, k: int, key, iters: int = 20,
                        with_assign: bool = False):
  """idx_batch (int32, distinct): GReg+ sampling (see module docstring).

  With with_assign=True returns (idx_batch, assign_N) — the clustering that was used.
  """
  n = feats_NxD.shape[0]
  if not 1 <= batch <= n:
    raise ValueError(f"energy_based_sample: batch={batch} needs 1 <= batch <= pool size ({n})")
  k_km, k_fill = jax.random.split(key)
  _, assign, _ = kmeans(feats_NxD, k, k_km, iters)
  member_KxN = assign[None, :] == jnp.arange(k)[:, None]
  nonempty_K = jnp.any(member_KxN, axis=1)
  lo_K = jnp.argmin(jnp.where(member_KxN, energies_N[None, :], jnp.inf), axis=1)
  hi_K = jnp.argmax(jnp.where(member_KxN, energies_N[None, :], -jnp.inf), axis=1)
  prio_N = jax.random.uniform(k_fill, (n,))           # random fill order, in [0, 1)
  prio_N = prio_N.at[hi_K].min(jnp.where(nonempty_K, -1.0, jnp.inf))
  prio_N = prio_N.at[lo_K].min(jnp.where(nonempty_K, -2.0, jnp.inf))
  idx = jnp.argsort(prio_N, stable=True)[:batch].astype(jnp.int32)
  return (idx, assign) if with_assign else idx
