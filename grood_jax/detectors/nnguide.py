"""NNGuide (Park et al., ICCV 2023, "Nearest neighbor guidance for out-of-distribution
detection"): the energy, guided by the confidence-scaled nearest train neighbours.

  bank:  g_i = (h_i / ||h_i||) * logsumexp(f_i)        for train samples i (the "guide")
  s(x)   = mean of the K largest inner products <h / ||h||, g_i> over the bank
  score  = logsumexp(f(x)) * s(x)

K = 100 (the authors'). The bank is the whole train split by default (`bank_fraction` = 1);
a fraction < 1 keeps a seeded random subset of max(K, round(fraction * N)) train samples
(OpenOOD's ImageNet setting is 0.01, taken there as the first batches of a shuffled loader).
The inner-product top-K is exact: one matmul per (query block x bank block) at precision
HIGHEST and a running top-K, memory bounded by the blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, DetectorError, Param, register

QUERY_BLOCK = 1024
BANK_BLOCK = 16384


@functools.partial(jax.jit, static_argnames=("k",))
def _mips_merge(q_QxD, bank_BxD, n_valid, best_QxK, *, k):
  s = jnp.matmul(q_QxD, bank_BxD.T, precision=ops.HIGHEST)
  s = jnp.where(jnp.arange(bank_BxD.shape[0])[None, :] < n_valid, s, -jnp.inf)
  return jax.lax.top_k(jnp.concatenate([best_QxK, s], axis=1), k)[0]


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  return x if len(x) == rows else np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:],
                                                              x.dtype)])


def topk_inner_products(q_QxD, bank_NxD, k: int, *, query_block: int = QUERY_BLOCK,
                        bank_block: int = BANK_BLOCK) -> np.ndarray:
  """The k largest <q, b> over the bank rows, per query, descending: numpy (Q, k) float32."""
  q_QxD, bank_NxD = ops.as_np32(q_QxD), ops.as_np32(bank_NxD)
  n = len(bank_NxD)
  if not 1 <= k <= n:
    raise DetectorError(f"nnguide: K={k} needs 1 <= K <= the bank size ({n})")
  qb, bb = max(1, min(query_block, len(q_QxD))), max(1, min(bank_block, n))
  blocks = [(jnp.asarray(_pad(bank_NxD[s:s + bb], bb)), jnp.int32(min(bb, n - s)))
            for s in range(0, n, bb)]
  out = np.empty((len(q_QxD), k), np.float32)
  for s in range(0, len(q_QxD), qb):
    q = jnp.asarray(_pad(q_QxD[s:s + qb], qb))
    best = jnp.full((qb, k), -jnp.inf, jnp.float32)
    for b, nv in blocks:
      best = _mips_merge(q, b, nv, best, k=k)
    out[s:s + qb] = np.asarray(best)[:min(qb, len(q_QxD) - s)]
  return out


@jax.jit
def _guide_bank(h_NxD, logits_NxC):
  return ops.l2_normalize(h_NxD) * ops.energy_score(logits_NxC)[:, None]


@register
class NNGuide(Detector):
  name = "nnguide"
  defaults = {"K": 100, "bank_fraction": 1.0}
  specs = {"K": Param("int", lo=1, doc="neighbours averaged"),
           "bank_fraction": Param("float", lo=0, hi=1, lo_open=True,
                                  doc="fraction of the train split kept in the bank")}
  grid = {"K": [10, 50, 100, 200]}
  description = "energy x mean inner product with the K nearest confidence-scaled train feats"

  def _bank_size(self, num_train: int) -> int:
    f = float(self.params["bank_fraction"])
    return num_train if f >= 1.0 else min(num_train, max(int(self.params["K"]),
                                                         int(round(f * num_train))))

  def check_data(self, *, num_train: int, num_classes: int, feature_dim: int) -> None:
    if self.params["K"] > num_train:
      raise DetectorError(f"nnguide.K={self.params['K']}: larger than the {num_train} training "
                          "samples; give K <= the number of training samples")

  def fit(self, ctx) -> dict:
    h, f = ops.as_np32(ctx.train.feats), ops.as_np32(ctx.train.logits)
    m = self._bank_size(len(h))
    if m < len(h):
      rows = np.sort(np.random.default_rng(ctx.seed).choice(len(h), size=m, replace=False))
      h, f = h[rows], f[rows]
    return {"bank_NxD": np.asarray(_guide_bank(h, f))}

  def score(self, ctx, state, split) -> np.ndarray:
    k = int(self.params["K"])
    q = np.asarray(ops.l2_normalize(ops.as_np32(split.feats)))
    guidance = topk_inner_products(q, state["bank_NxD"], k).astype(np.float64).mean(axis=1)
    energy = np.asarray(ops.energy_score(ops.as_np32(split.logits)), np.float64)
    return ops.as_np32(energy * guidance)
