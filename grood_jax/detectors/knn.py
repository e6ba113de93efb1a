"""Deep nearest neighbours (Sun et al., 2022).

  z = h / ||h||,   score = -||z - z_(k)||   (distance to the k-th nearest L2-normalised train
                                             feature; k = 50)

Exact search (`ops.knn_search`), so the score is deterministic. OpenOOD ranks by the
squared distance (FAISS IndexFlatL2); the ranking is the same.

The fitted bank is one copy, on the device (`ops.put_bank`, a `DeviceBank`; a `ShardedBank`
on a mesh): the train features are normalised one bank block at a time straight into it, so
neither a normalised host copy nor a second device copy per scored set exists.
"""

from __future__ import annotations

import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, DetectorError, Param, register


class _UnitRows:
  """The L2-normalised rows of (N, D) features, computed on each slice (`put_bank` reads one
  bank block at a time); `np.asarray` normalises them all (the mesh path)."""

  def __init__(self, feats):
    self.feats = feats
    self.shape = tuple(np.shape(feats))
    self.dtype = np.dtype(np.float32)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows):
    return np.asarray(ops.l2_normalize(ops.as_np32(self.feats[rows])))

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(ops.l2_normalize(ops.as_np32(self.feats)))
    return out if dtype is None else out.astype(dtype)


@register
class KNN(Detector):
  name = "knn"
  defaults = {"k": 50, "query_block": 1024, "bank_block": 16384}
  specs = {"k": Param("int", lo=1), "query_block": Param("int", lo=1), "bank_block": Param("int", lo=1)}

  def check_data(self, *, num_train: int, num_classes: int, feature_dim: int) -> None:
    if self.params["k"] > num_train:
      raise DetectorError(f"knn.k={self.params['k']}: larger than the bank of {num_train} "
                          "training features; give k <= the number of training samples")

  grid = {"k": [1, 10, 50, 100, 200]}
  description = "minus the distance to the k-th nearest normalised train feature"

  uses_train_logits = False

  def fit(self, ctx) -> dict:
    return {"bank_NxD": ops.put_bank(_UnitRows(ctx.train.feats), 1,
                                     query_block=int(self.params["query_block"]),
                                     bank_block=int(self.params["bank_block"]))}

  def score(self, ctx, state, split) -> np.ndarray:
    k = int(self.params["k"])
    n = len(state["bank_NxD"])
    if not 1 <= k <= n:
      raise DetectorError(f"knn: k={k} needs 1 <= k <= the number of train features ({n})")
    bar = ctx.bar(f"knn {split.name} vs bank of {n}", len(split.feats), "query")
    try:
      d, _ = ops.knn_search(ops.l2_normalize(ops.as_np32(split.feats)), state["bank_NxD"], k,
                            query_block=int(self.params["query_block"]),
                            bank_block=int(self.params["bank_block"]), progress=bar.update)
    finally:
      bar.close()
    return ops.as_np32(-np.sqrt(d[:, k - 1]))
