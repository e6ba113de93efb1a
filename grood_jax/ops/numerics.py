"""The numerics every method shares, each written once (jnp, jit/vmap/grad-safe).

  safe_norm(x)              ||x|| over the last axis, gradient 0 (not NaN) at x = 0
  l2_normalize(x)           rows divided by their norm; a zero row stays zero
  pairwise_sq_dists(a, b)   max(||a||^2 - 2 a.b + ||b||^2, 0): (N, M) from one matmul
  energy_score(f, T)        T * logsumexp(f / T): the NEGATIVE free energy, higher = more ID
                            (the Energy detector's score; Liu et al. 2020)
  free_energy(f, T)         -T * logsumexp(f / T): the free energy itself, lower = more ID
                            (GReg's S(x), METHOD.md §2)
  max_softmax(f, T)         max_c softmax(f / T)_c
  affine(h, W, b)           h W^T + b at matmul precision HIGHEST
  as_np32(x)                numpy float32 view/copy
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def as_np32(x) -> np.ndarray:
  """`x` as a numpy float32 array (no copy when it already is one)."""
  return np.asarray(x, dtype=np.float32)


def safe_norm(x, axis: int = -1):
  """Euclidean norm over `axis` whose gradient at 0 is 0 instead of NaN (double `where`)."""
  sq = jnp.sum(x * x, axis=axis)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def l2_normalize(x_NxD, eps: float = 1e-12):
  """Each row (last axis) divided by its L2 norm, floored at `eps`: a zero row stays zero."""
  x_NxD = jnp.asarray(x_NxD)
  return x_NxD / jnp.maximum(safe_norm(x_NxD)[..., None], eps)


def pairwise_sq_dists(a_NxD, b_MxD):
  """Squared Euclidean distances (N, M) as ||a||^2 - 2 a.b + ||b||^2 (one matmul at precision
  HIGHEST, no (N, M, D) tensor), clamped at 0. Cancellation error ~1e-7 * ||a||^2: re-rank with
  an explicit difference where near-ties matter (`ops.knn.knn_search(..., exact=True)`)."""
  aa_N = jnp.sum(a_NxD * a_NxD, axis=1)
  bb_M = jnp.sum(b_MxD * b_MxD, axis=1)
  cross_NxM = jnp.matmul(a_NxD, b_MxD.T, precision=HIGHEST)
  return jnp.maximum(aa_N[:, None] - 2.0 * cross_NxM + bb_M[None, :], 0.0)


def energy_score(logits_NxC, temperature=1.0):
  """T * logsumexp(f / T): the negative free energy, higher = more in-distribution."""
  return temperature * jax.nn.logsumexp(logits_NxC / temperature, axis=-1)


def free_energy(logits_NxC, temperature=1.0):
  """-T * logsumexp(f / T): the free energy (GReg's S(x)), lower = more in-distribution."""
  return -energy_score(logits_NxC, temperature)


def max_softmax(logits_NxC, temperature=1.0):
  """max_c softmax(f / T)_c."""
  return jnp.max(jax.nn.softmax(logits_NxC / temperature, axis=-1), axis=-1)


def affine(h_NxD, w_CxD, b_C):
  """h W^T + b (precision HIGHEST)."""
  return jnp.matmul(h_NxD, w_CxD.T, precision=HIGHEST) + b_C
