"""Deep nearest neighbours (Sun et al., 2022).

  z = h / ||h||,   score = -||z - z_(k)||   (distance to the k-th nearest L2-normalised train
                                             feature; k = 50)

Exact search (`_common.knn_search`), so the score is deterministic. OpenOOD ranks by the
squared distance (FAISS IndexFlatL2); the ranking is the same.
"""

from __future__ import annotations

import numpy as np

from grood_jax.detectors import _common
from grood_jax.detectors.base import Detector, DetectorError, register


@register
class KNN(Detector):
  name = "knn"
  defaults = {"k": 50, "query_block": 1024, "bank_block": 16384}
  grid = {"k": [1, 10, 50, 100, 200]}
  description = "minus the distance to the k-th nearest normalised train feature"

  def fit(self, ctx) -> dict:
    return {"bank_NxD": np.asarray(_common.l2_normalize(_common.as_np32(ctx.train.feats)))}

  def score(self, ctx, state, split) -> np.ndarray:
    k = int(self.params["k"])
    n = len(state["bank_NxD"])
    if not 1 <= k <= n:
      raise DetectorError(f"knn: k={k} needs 1 <= k <= the number of train features ({n})")
    d, _ = _common.knn_search(_common.l2_normalize(_common.as_np32(split.feats)),
                              state["bank_NxD"], k, query_block=int(self.params["query_block"]),
                              bank_block=int(self.params["bank_block"]))
    return _common.as_np32(-np.sqrt(d[:, k - 1]))
