"""Per-sample parameter gradients of y(x) = logsumexp f(x), flattened, and their statistics.

The low-dimensional gradient method (METHOD.md §3) works with

  g(x) = d/dθ logsumexp f(x; θ)  ∈ R^P          (θ: every trainable parameter, flattened)
  g̃(x) = (g(x) − μ) / s                         (μ, s: per-coordinate train mean and scale)

`param_grads` computes a batch of g as `jax.vmap(jax.grad(y))` in one `jax.jit`. The
gradient is w.r.t. the `nnx.Param` leaves only: the rest of the parameter State (BatchNorm
running statistics, ...) enters as constants, and BatchNorm runs in eval mode (ModelFns puts
the model in eval mode), so every sample's gradient is independent of the other samples in its
batch. The flat order of θ is `jax.flatten_util.ravel_pytree` of the Param leaves.

Train statistics stream over fixed-size padded batches (padding masked out), merging per-batch
means and sums of squared deviations (Chan et al.'s parallel update), so memory is O(B·P) and the
N×P matrix is never formed.

Zero-variance coordinates. Dividing by sqrt(var) blows up coordinates that never vary on the
train set (e.g. weights behind a dead unit): on a test sample any nonzero value there would
dominate every distance. We read METHOD.md's "zero-variance coordinates get the largest scale"
literally: the divisor s of such a coordinate is the largest train standard deviation over all
coordinates, so these coordinates are scaled *down* the most and stay finite, instead of an
arbitrary epsilon that would make them the loudest. "Zero" means std <= rel_tol · max std
(rel_tol = 1e-6 by default; float32 rounding leaves ~1e-7 relative noise on a constant column).
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from grood_jax import parallel
from grood_jax.features import batches, normalize, pad_batch


# ------------------------------------------------------------------ parameters


def split_trainable(params):
  """(trainable, frozen): the `nnx.Param` leaves of an nnx State and everything else.

  A plain pytree (not an nnx State) is taken as all-trainable; frozen is then None.
  """
  if isinstance(params, nnx.State):
    return nnx.split_state(params, nnx.Param, ...)
  return params, None


def merge_trainable(trainable, frozen):
  """Inverse of `split_trainable`."""
  if frozen is None:
    return trainable
  return nnx.merge_state(trainable, frozen)


def flat_params(params) -> jax.Array:
  """θ_P: the trainable parameters flattened (ravel_pytree order)."""
  return ravel_pytree(split_trainable(params)[0])[0]


def num_params(params) -> int:
  """P, the number of trainable parameters."""
  return int(sum(np.size(a) for a in jax.tree.leaves(split_trainable(params)[0])))


def lse_of_params(fns, params):
  """(θ_P, y) with y(θ_P, x_HxWxC) = logsumexp f(x) of one sample, a pure function of θ."""
  trainable, frozen = split_trainable(params)
  theta_P, unravel = ravel_pytree(trainable)

  def y(theta_P, x_HxWxC):
    p = merge_trainable(unravel(theta_P), frozen)
    return jax.nn.logsumexp(fns.logits(p, x_HxWxC[None])[0])

  return theta_P, y


def param_grads(fns, params, x_BxHxWxC, chunk: int | None = None) -> jax.Array:
  """G_BxP: row i is d/dθ logsumexp f(x_i) (float32), one vmap(grad) in one jit per chunk.

  With `chunk`, the batch is computed `chunk` rows per call and the rows concatenated (default
  None: the whole batch in one call, what the low-dim detectors use). vmap turns the per-sample
  conv-kernel gradients into batch-grouped convolutions, and on XLA:CPU those run slower per
  row at larger groups: on the default SmallCNN (P = 54,358), per image, 8 rows per call took
  0.56-0.69x the time of 64 (16: 0.70-0.78x, 32: 0.82-0.93x; idle 2-core "AMD EPYC",
  2026-12-02; `lax.map` over the chunks inside one jit was 8x slower than one call).
  Each row is its own sample's gradient either way; chunking changes only the float rounding
  of the grouped convolutions (rows agree to ~1e-7 relative), but that was enough to move the
  low-dim probes (on the 6v4 checkpoint `--select` chose lowdim_energy K = 32 instead of 128,
  lowdim_msp AUROCs moved by 3e-3) for ~20 s of a 6-minute `--select` run, so it is not the
  detectors' default (the same reason the custom-JVP max pool was reverted).

  Inside `parallel.data_parallel` with several devices the batch is replicated, not split,
  for this one function (every device computes all rows): split over the batch, the
  batch-grouped convolutions that vmap makes of per-sample conv-kernel gradients came out
  wrong (jax 0.10.2 / XLA CPU, 4 devices: rows of devices 1-3 off by up to 0.17 under SPMD;
  every row off under an explicit `jax.shard_map`; replicated rows exact). The other batch
  work (features, GROOD, kNN) is split; tests/test_sharding.py checks every detector.
  """
  if chunk is not None and int(chunk) < 1:
    raise ValueError(f"param_grads: chunk must be >= 1 or None, got {chunk}")
  m = parallel.active_mesh()
  if m is not None:
    x_BxHxWxC = parallel.replicate(x_BxHxWxC, m)
  b = int(x_BxHxWxC.shape[0])
  if chunk is None or int(chunk) >= b:
    return _param_grads(fns, params, x_BxHxWxC)
  chunk = int(chunk)
  return jnp.concatenate([_param_grads(fns, params, x_BxHxWxC[s:s + chunk])
                          for s in range(0, b, chunk)])


@functools.partial(jax.jit, static_argnums=0)
def _param_grads(fns, params, x_BxHxWxC) -> jax.Array:
  theta_P, y = lse_of_params(fns, params)
  return jax.vmap(jax.grad(y), in_axes=(None, 0))(theta_P, x_BxHxWxC)


# ------------------------------------------------------------------ batching


def iter_inputs(images, batch_size: int, mean=None, std=None
                ) -> Iterator[tuple[jax.Array, jax.Array, int, int]]:
  """Yields (x_BxHxWxC float32, mask_B bool, start, stop) over fixed-size padded batches.

  uint8 images are normalised with `normalize(images, mean, std)` when mean/std are given;
  float images are used as they are (already model inputs). Every batch, even of a split
  smaller than batch_size, is padded to batch_size by repeating its last row (`pad_batch`)
  and mask_B marks the real rows, so one compilation per model serves every split.
  """
  n = len(images)
  if n == 0:
    raise ValueError("lowdim: no images")
  bs = parallel.round_batch(int(batch_size))
  for start, stop in batches(n, bs):
    xb = pad_batch(np.asarray(images[start:stop]), bs)
    if mean is not None:
      xb = normalize(xb, mean, std)
    mask = np.arange(bs) < (stop - start)
    yield parallel.put_batch(xb, np.float32), parallel.put_batch(mask), start, stop


class GradBatches:
  """The per-sample gradient batches G_BxP of a set of images, for the passes over them.

  Iterating yields (G_BxP, mask_B, start, stop) over the fixed-size padded batches of
  `iter_inputs`. The first complete pass computes them with `param_grads`; when all the padded
  batches fit in `keep_bytes` (4 · ceil(N / B) · B · P bytes, float32) they are kept (as device
  arrays) and every later pass reads them instead of re-running the model, so a fit that makes
  several passes (statistics, subspace iterations, reduction) computes each gradient once.
  Kept or not, every pass sees the same arrays, so the results are the same bit for bit.
  `keep_bytes=0` keeps nothing (memory O(B·P), the N×P matrix never formed).
  """

  def __init__(self, fns, params, images, *, batch_size: int = 64, mean=None, std=None,
               keep_bytes: int = 0):
    if len(images) == 0:
      raise ValueError("lowdim: no images")
    self.fns, self.params, self.images = fns, params, images
    self.batch_size, self.mean, self.std = int(batch_size), mean, std
    bs = parallel.round_batch(self.batch_size)
    padded = -(-len(images) // bs) * bs
    self.nbytes = 4 * padded * num_params(params)
    self.keeps = self.nbytes <= int(keep_bytes)
    self._kept = None

  def __len__(self) -> int:
    return len(self.images)

  def __iter__(self):
    if self._kept is not None:
      yield from self._kept
      return
    kept = [] if self.keeps else None
    for x, mask, start, stop in iter_inputs(self.images, self.batch_size, self.mean, self.std):
      item = (param_grads(self.fns, self.params, x), mask, start, stop)
      if kept is not None:
        kept.append(item)
      yield item
    if kept is not None:
      self._kept = kept


def grad_batches(fns, params, images, batch_size: int = 64, mean=None, std=None) -> GradBatches:
  """`images` itself when it is a GradBatches, else one that keeps nothing."""
  if isinstance(images, GradBatches):
    return images
  return GradBatches(fns, params, images, batch_size=batch_size, mean=mean, std=std)


# ------------------------------------------------------------------ train statistics


@jax.jit
def _stats_merge(g_BxP, mask_B, n, mean_P, m2_P):
  w_B = mask_B.astype(g_BxP.dtype)
  nb = jnp.sum(w_B)
  mean_b = jnp.sum(w_B[:, None] * g_BxP, axis=0) / jnp.maximum(nb, 1.0)
  m2_b = jnp.sum(w_B[:, None] * jnp.square(g_BxP - mean_b), axis=0)
  n_new = n + nb
  delta_P = mean_b - mean_P
  frac = nb / jnp.maximum(n_new, 1.0)
  mean_P = mean_P + delta_P * frac
  m2_P = m2_P + m2_b + jnp.square(delta_P) * n * frac
  return n_new, mean_P, m2_P


def grad_scale(var_P, rel_tol: float = 1e-6) -> jax.Array:
  """s_P = sqrt(var), with (near-)zero-variance coordinates given the largest std.

  Coordinates with std <= rel_tol · max std get s = max std (see the module docstring); if
  every coordinate is constant, s = 1.
  """
  std_P = jnp.sqrt(jnp.maximum(jnp.asarray(var_P, jnp.float32), 0.0))
  smax = jnp.max(std_P)
  smax = jnp.where(smax > 0, smax, 1.0)
  return jnp.where(std_P <= rel_tol * smax, smax, std_P)


def grad_stats(fns, params, images, *, batch_size: int = 64, mean=None, std=None,
               rel_tol: float = 1e-6) -> dict:
  """Streaming train statistics of the per-sample gradients (`images`: an image array, or a
  `GradBatches`).

  Returns {"mean_P", "var_P" (population variance, ddof 0), "scale_P" (`grad_scale`), "n"}.
  Peak memory O(B·P) for batch size B; never N×P.
  """
  p = num_params(params)
  n = jnp.zeros((), jnp.float32)
  mean_P = jnp.zeros((p,), jnp.float32)
  m2_P = jnp.zeros((p,), jnp.float32)
  for g_BxP, mask, _, _ in grad_batches(fns, params, images, batch_size, mean, std):
    n, mean_P, m2_P = parallel.settle(_stats_merge(g_BxP, mask, n, mean_P, m2_P))
  var_P = m2_P / jnp.maximum(n, 1.0)
  return {"mean_P": mean_P, "var_P": var_P, "scale_P": grad_scale(var_P, rel_tol),
          "n": int(n)}


def normalize_grads(g_BxP, mean_P, scale_P):
  """g̃ = (g − μ) / s."""
  return (g_BxP - mean_P) / scale_P


def normalized_grads(fns, params, x_BxHxWxC, mean_P, scale_P) -> jax.Array:
  """G̃_BxP of one batch.

  The per-sample gradients come from the one jitted `param_grads` (compiled once per
  model and batch shape and shared by the statistics, subspace and reduction passes); the
  cheap elementwise / matmul work after it runs in small separate jits.
  """
  return _normalize_jit(param_grads(fns, params, x_BxHxWxC), mean_P, scale_P)


_normalize_jit = jax.jit(normalize_grads)
