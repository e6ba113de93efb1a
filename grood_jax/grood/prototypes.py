"""Prototypes: class means of the penultimate features (by true label), class means of the
flattened early feature maps (streamed), and the nearest-class-prototype prediction.

The GROOD state holds them as a plain dict of arrays (`class_protos`, `ood_proto`,
`early_protos`): a pytree as it is, to save, shard or differentiate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import parallel
from grood_jax.features import batches, normalize, pad_batch
from grood_jax.ops import pairwise_sq_dists


def _check_labels(labels_N: np.ndarray, num_classes: int) -> np.ndarray:
  labels_N = np.asarray(labels_N)
  if labels_N.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels_N.shape}")
  if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                     f"[{labels_N.min()}, {labels_N.max()}]")
  counts_C = np.bincount(labels_N, minlength=num_classes)
  empty = np.flatnonzero(counts_C == 0)
  if empty.size:
    raise ValueError(f"class(es) {empty.tolist()} have no training samples: their prototype is "
                     "undefined; give every class at least one sample")
  return labels_N.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _segment_sums(x_NxF, labels_N, num_classes):
  """Per-class sums and counts; labels equal to num_classes (padding) are dropped."""
  sums = jax.ops.segment_sum(x_NxF, labels_N, num_segments=num_classes + 1)
  counts = jax.ops.segment_sum(jnp.ones_like(labels_N, jnp.float32), labels_N,
                               num_segments=num_classes + 1)
  return sums[:num_classes], counts[:num_classes]


def class_means(feats_NxD, labels_N, num_classes: int) -> jax.Array:
  """Plain mean of the features of each TRUE-label class: (C, D) float32.

  Raises ValueError when a class has no sample (its prototype would be undefined).
  """
  labels_N = _check_labels(labels_N, num_classes)
  sums_CxD, counts_C = _segment_sums(jnp.asarray(feats_NxD, jnp.float32), jnp.asarray(labels_N),
                                     num_classes)
  return sums_CxD / counts_C[:, None]


def early_class_means(fns, params, images_u8: np.ndarray, labels_N, num_classes: int, *,
                      mean, std, batch_size: int = 256, layer: str | None = None) -> jax.Array:
  """Class means of the flattened early feature map, streamed over the images: (C, F).

  `layer`: a named split point of the model (fns.split_points) instead of the early layer
  (None or the first split point: `fns.early`, as before).

  Memory stays at one batch of early maps plus the (C, F) sums, whatever the data set size
  (the full (N, F) early matrix of a CIFAR/ImageNet train set would not fit).
  """
  labels_N = _check_labels(labels_N, num_classes)
  bs = parallel.round_batch(min(batch_size, len(images_u8)))

  if layer is not None and fns.resolve_split(layer) == fns.split_points[0]:
    layer = None

  @jax.jit
  def batch_sums(x, lab):
    e = fns.early(params, x) if layer is None else fns.features_at(params, layer, x)
    return _segment_sums(e.reshape(e.shape[0], -1).astype(jnp.float32), lab, num_classes)

  total, counts = None, None
  for start, stop in batches(len(images_u8), bs):
    xb = pad_batch(images_u8[start:stop], bs)
    lab = np.full((bs,), num_classes, np.int32)    # padding rows go to the dropped segment
    lab[:stop - start] = labels_N[start:stop]
    s, c = batch_sums(parallel.put_batch(normalize(xb, mean, std)), parallel.put_batch(lab))
    # summed on the host in float64 (one small (C, F) transfer per batch): exact enough for
    # any N, and no chain of queued device programs (with a batch split over several CPU
    # devices, queued programs whose collectives wait on each other can stall XLA's pool)
    s, c = np.asarray(s, np.float64), np.asarray(c, np.float64)
    total = s if total is None else total + s
    counts = c if counts is None else counts + c
  return jnp.asarray(total / counts[:, None], jnp.float32)


def nearest_prototype(feats_NxD, protos_CxD) -> np.ndarray:
  """NCP prediction argmin_c ||h - p_c||: (N,) int32."""
  return np.asarray(_nearest(jnp.asarray(feats_NxD, jnp.float32),
                             jnp.asarray(protos_CxD, jnp.float32)))


@jax.jit
def _nearest(feats_NxD, protos_CxD):
  return jnp.argmin(pairwise_sq_dists(feats_NxD, protos_CxD), axis=-1).astype(jnp.int32)
