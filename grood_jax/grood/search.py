"""Scores from a bank of gradients: nearest-neighbour distance, cosine, or the L1 norm.

  score_kind="knn", metric="l2"     score = -||g - g_(k)||^2   (k-th nearest bank gradient)
  score_kind="knn", metric="cosine" score = -(1 - cos(g, g_(k)))  on L2-normalised gradients
                                    (= -||g^ - g^_(k)||^2 / 2; a zero gradient counts as cos 0)
  score_kind="l1norm"               score = -||g||_1            (no bank)

The exact search is blocked over queries and over the bank (matmul at precision HIGHEST +
lax.top_k with a running merge), so memory stays bounded whatever the bank size: the library's
one `grood_jax.ops.knn_search` (ties go to the lower bank index).
"""

from __future__ import annotations

import numpy as np

from grood_jax.ops import DeviceBank, ShardedBank, knn_search, l2_normalize, put_bank

METRICS = ("l2", "cosine")
SCORE_KINDS = ("knn", "l1norm")


def bank_scores(grads_QxD, bank_NxD, *, k: int = 1, metric: str = "l2",
                query_block: int = 1024, bank_block: int = 4096,
                progress=None) -> np.ndarray:
  """-(distance to the k-th nearest bank gradient): numpy float32 (Q,), higher = more ID.
  `bank_NxD`: an (N, D) array, or a bank placed once by `place_bank` (reused across query
  chunks). `progress(n)` is called after each query block with the queries done."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  grads_QxD = np.asarray(grads_QxD, np.float32)
  placed = isinstance(bank_NxD, (DeviceBank, ShardedBank))
  if not placed:
    bank_NxD = np.asarray(bank_NxD, np.float32)
  if metric == "cosine":
    grads_QxD = np.asarray(l2_normalize(grads_QxD))
    if not placed:
      bank_NxD = np.asarray(l2_normalize(bank_NxD))
  d_QxK, _ = knn_search(grads_QxD, bank_NxD, k, query_block=query_block,
                        bank_block=None if placed else bank_block, progress=progress)
  d_Q = np.asarray(d_QxK)[:, k - 1]
  if metric == "cosine":
    d_Q = d_Q / 2.0                                  # ||a - b||^2 / 2 = 1 - cos on unit rows
  return (-d_Q).astype(np.float32)


def place_bank(bank_NxD, *, k: int = 1, metric: str = "l2", query_block: int = 1024,
               bank_block: int = 4096):
  """The gradient bank on the device(s) once (`ops.put_bank`; L2-normalised first for
  metric="cosine"), for `bank_scores` / `gradient_scores` over many query chunks. A bank
  placed already (`DeviceBank` / `ShardedBank`) is returned as it is for metric="l2"."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if metric == "l2" and isinstance(bank_NxD, (DeviceBank, ShardedBank)):
    return bank_NxD                                  # placed already (GROOD's fit does)
  bank_NxD = np.asarray(bank_NxD, np.float32)
  if metric == "cosine":
    bank_NxD = np.asarray(l2_normalize(bank_NxD))
  return put_bank(bank_NxD, k, query_block=query_block, bank_block=bank_block)


def l1_scores(grads_QxD) -> np.ndarray:
  """-||g||_1: numpy float32 (Q,)."""
  return (-np.abs(np.asarray(grads_QxD, np.float32)).sum(axis=1)).astype(np.float32)


def gradient_scores(grads_QxD, bank_NxD, *, score_kind: str = "knn", k: int = 1,
                    metric: str = "l2", query_block: int = 1024,
                    bank_block: int = 4096, progress=None) -> np.ndarray:
  """The GROOD score of query gradients, by score_kind (see the module docstring)."""
  if score_kind == "l1norm":
    if progress is not None:
      progress(len(grads_QxD))
    return l1_scores(grads_QxD)
  if score_kind != "knn":
    raise ValueError(f"score_kind must be one of {SCORE_KINDS}, got {score_kind!r}")
  return bank_scores(grads_QxD, bank_NxD, k=k, metric=metric, query_block=query_block,
                     bank_block=bank_block, progress=progress)
