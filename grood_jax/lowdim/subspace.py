"""Subspaces of the normalised train gradients, and reduced gradients z = Vᵀ g̃.

Both subspaces stream the train set in fixed-size padded batches: one batch of normalised
per-sample gradients G̃_b (B×P) lives in memory at a time, never the N×P matrix.

`pca_subspace` — top-K principal directions, matrix-free randomised subspace iteration
(Halko, Martinsson & Tropp 2011, Alg. 4.4 + Rayleigh–Ritz). With A the N×P matrix of normalised
gradients (rows g̃_i), each pass over the data accumulates W = AᵀA V = Σ_b G̃_bᵀ (G̃_b V):

  V ← orth(Ω)                      Ω: P×L Gaussian, L = K + oversample (seeded key)
  repeat power_iters times:  V ← orth(AᵀA V)          (QR)
  W = AᵀA V;  T = VᵀW (L×L);  T = E Λ Eᵀ;  V_K = V E[:, top K]

Centring: the rows are centred by the train mean μ that also normalises them (g̃ = (g − μ)/s),
so A has zero column means when the statistics and the subspace are fitted on the same samples
and the directions are the principal components of the centred normalised gradients (no extra
centring step). Eigenvalues are returned as variances (Λ / N).

Peak memory (float32, measured with XLA's compiled memory analysis on CPU for a SmallCNN with
P = 26 074, B ∈ {16, 64}, L ∈ {26, 74}: the B·P and L·P buffers below are the measured ones):
  gradient pass: 4 bytes · (2·B·P + 3·L·P) + B · (activations of one sample's backward pass)
    — G_b and its normalised copy G̃_b (B·P each), V, W in and W out (L·P each);
  QR step: 4 bytes · 4·L·P (old V, W, QR workspace, new V).
E.g. ResNet-18 (P ≈ 11.2 M), K = 64 (L = 74): B = 64 → ≈ 15.7 GB; B = 16 → ≈ 11.4 GB. Lower
`batch_size` (or K) to fit smaller devices; the N×P matrix is never formed.
Cost: (power_iters + 1) passes of per-sample gradients over the fit set; each function also
takes a `grads.GradBatches` in place of the images, and one that keeps its batches computes
every gradient once for all the passes (the low-dim detectors' fit: 7 passes -> 1 when the fit
set's N×P gradients fit in `grad_cache_mib`).

`class_mean_subspace` — column c is the mean normalised gradient of the train samples of class
c, L2-normalised (a class with no sample, or a zero mean, gives a zero column). Not orthogonal.

`reduce_grads` — z = Vᵀ g̃ for every image of a split, batched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import parallel
from grood_jax.lowdim.grads import grad_batches, normalize_grads, num_params

HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _gram_step(g_BxP, mask_B, mean_P, scale_P, w_PxL, v_PxL):
  """W += G̃_bᵀ (G̃_b V) over the real rows of one batch."""
  gt_BxP = normalize_grads(g_BxP, mean_P, scale_P)
  gt_BxP = jnp.where(mask_B[:, None], gt_BxP, 0.0)
  u_BxL = jnp.matmul(gt_BxP, v_PxL, precision=HIGHEST)
  return w_PxL + jnp.matmul(gt_BxP.T, u_BxL, precision=HIGHEST)


def _gram_apply(fns, params, stats, images, v_PxL, batch_size, mean, std):
  w_PxL = jnp.zeros_like(v_PxL)
  for g_BxP, mask, _, _ in grad_batches(fns, params, images, batch_size, mean, std):
    w_PxL = parallel.settle(_gram_step(g_BxP, mask, stats["mean_P"],
                                       stats["scale_P"], w_PxL, v_PxL))
  return w_PxL


@jax.jit
def _orth(w_PxL):
  return jnp.linalg.qr(w_PxL)[0]


def pca_subspace(fns, params, stats: dict, images, k: int, *, key, power_iters: int = 4,
                 oversample: int = 10, batch_size: int = 64, mean=None, std=None
                 ) -> tuple[jax.Array, jax.Array]:
  """Top-k principal directions of the normalised train gradients, matrix-free.

  Args: `stats` from `grad_stats` on the same images; images uint8 (normalised with mean/std)
  or float model inputs; `key` seeds the random start. Returns (V_PxK orthonormal columns,
  variances_K descending).
  """
  p = num_params(params)
  n = len(images)
  k = int(k)
  if not 1 <= k <= p:
    raise ValueError(f"pca_subspace: K={k} needs 1 <= K <= P ({p})")
  ell = min(k + max(int(oversample), 0), p)
  v_PxL = _orth(jax.random.normal(key, (p, ell), jnp.float32))
  for _ in range(int(power_iters)):
    v_PxL = _orth(_gram_apply(fns, params, stats, images, v_PxL, batch_size, mean, std))
  w_PxL = _gram_apply(fns, params, stats, images, v_PxL, batch_size, mean, std)
  return _rayleigh_ritz(v_PxL, w_PxL, k, n)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rayleigh_ritz(v_PxL, w_PxL, k, n):
  t_LxL = jnp.matmul(v_PxL.T, w_PxL, precision=HIGHEST)
  t_LxL = 0.5 * (t_LxL + t_LxL.T)
  evals, evecs = jnp.linalg.eigh(t_LxL)           # ascending
  top = jnp.arange(k)
  evals = evals[::-1][top]
  evecs = evecs[:, ::-1][:, top]
  return jnp.matmul(v_PxL, evecs, precision=HIGHEST), jnp.maximum(evals, 0.0) / max(n, 1)


@functools.partial(jax.jit, static_argnums=5)
def _class_sum_step(g_BxP, mask_B, labels_B, mean_P, scale_P, num_classes, sums_CxP, counts_C):
  gt_BxP = normalize_grads(g_BxP, mean_P, scale_P)
  onehot_BxC = jax.nn.one_hot(labels_B, num_classes, dtype=gt_BxP.dtype)
  onehot_BxC = onehot_BxC * mask_B[:, None].astype(gt_BxP.dtype)
  sums_CxP = sums_CxP + jnp.matmul(onehot_BxC.T, gt_BxP, precision=HIGHEST)
  return sums_CxP, counts_C + jnp.sum(onehot_BxC, axis=0)


def class_mean_subspace(fns, params, stats: dict, images, labels, num_classes: int, *,
                        batch_size: int = 64, mean=None, std=None) -> jax.Array:
  """V_PxC: column c = mean g̃ over train samples of class c, L2-normalised (zero stays zero)."""
  p = num_params(params)
  labels = np.asarray(labels, np.int32)
  sums_CxP = jnp.zeros((num_classes, p), jnp.float32)
  counts_C = jnp.zeros((num_classes,), jnp.float32)
  for g_BxP, mask, start, stop in grad_batches(fns, params, images, batch_size, mean, std):
    lab = np.zeros(g_BxP.shape[0], np.int32)
    lab[:stop - start] = labels[start:stop]
    sums_CxP, counts_C = parallel.settle(_class_sum_step(
        g_BxP, mask, parallel.put_batch(lab), stats["mean_P"],
        stats["scale_P"], int(num_classes), sums_CxP, counts_C))
  means_CxP = sums_CxP / jnp.maximum(counts_C, 1.0)[:, None]
  norms_C = jnp.linalg.norm(means_CxP, axis=1)
  return (means_CxP / jnp.where(norms_C > 0, norms_C, 1.0)[:, None]).T


@jax.jit
def _reduce_step(g_BxP, mean_P, scale_P, v_PxK):
  gt_BxP = normalize_grads(g_BxP, mean_P, scale_P)
  return jnp.matmul(gt_BxP, v_PxK, precision=HIGHEST)


def reduce_grads(fns, params, stats: dict, v_PxK, images, *, batch_size: int = 64, mean=None,
                 std=None) -> np.ndarray:
  """z_NxK = G̃ V for every image (numpy float32), one batch of gradients in memory at a time."""
  out = np.empty((len(images), v_PxK.shape[1]), np.float32)
  for g_BxP, _, start, stop in grad_batches(fns, params, images, batch_size, mean, std):
    z = _reduce_step(g_BxP, stats["mean_P"], stats["scale_P"], v_PxK)
    out[start:stop] = np.asarray(z)[:stop - start]
  return out
