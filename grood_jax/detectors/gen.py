"""GEN (Liu et al., 2023): generalised entropy of the top-M softmax probabilities.

  score = -sum_{j in top-M} p_j^gamma (1 - p_j)^gamma,   p = softmax(f)

Parameters: gamma (default 0.1) and M, the number of largest probabilities summed: an int
clipped to the number of classes C at fit / score time, or "half" (C // 2) or "all" (C). The
default M = 100 is the authors' (their code's and OpenOOD's default, gamma = 0.1, M = 100):
it resolves to M = C = 10 on CIFAR-10, M = C = 100 on CIFAR-100 (our choice for CIFAR-100: the
same default, i.e. all classes) and M = 100 of 1000 on ImageNet-1K; M = min(100, C) in general.
The grid uses the relative forms so that it fits any C. gamma and M are traced (one compilation
per logits shape for the whole grid): the probabilities after the M largest are set to 0,
whose term 0^gamma (1 - 0)^gamma is 0 (gamma > 0), and the sum runs over all C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, DetectorError, Param, register


@jax.jit
def _gen_scores(logits_NxC, gamma, m):
  c = logits_NxC.shape[1]
  p_NxC, _ = jax.lax.top_k(jax.nn.softmax(logits_NxC, axis=-1), c)
  p_NxC = jnp.where(jnp.arange(c)[None, :] < m, p_NxC, 0.0)   # a zeroed p adds 0^g 1^g = 0
  return -jnp.sum(p_NxC ** gamma * (1.0 - p_NxC) ** gamma, axis=-1)


def gen_scores(logits_NxC, gamma, *, m):
  """-sum over the m largest p of p^gamma (1-p)^gamma (N,); gamma and m are traced."""
  return _gen_scores(logits_NxC, gamma, np.int32(m))


def resolve_m(m, num_classes: int) -> int:
  if m == "all":
    return num_classes
  if m == "half":
    return max(1, num_classes // 2)
  if isinstance(m, (int, np.integer)) and not isinstance(m, bool) and m >= 1:
    return min(int(m), num_classes)
  raise DetectorError(f"gen: M must be an int >= 1, 'half' or 'all', got {m!r}")


@register
class GEN(Detector):
  name = "gen"
  defaults = {"gamma": 0.1, "M": 100}
  specs = {"gamma": Param("float", lo=0, lo_open=True), "M": Param("int", lo=1, choices=("half", "all"))}
  grid = {"gamma": [0.01, 0.1, 0.5, 1.0], "M": ["half", "all"]}
  description = ("generalised entropy of the top-M softmax probabilities; default M = "
                 "min(100, C) as the authors: 10 on CIFAR-10, 100 on CIFAR-100 and ImageNet-1K")

  def score(self, ctx, state, split) -> np.ndarray:
    logits = ops.as_np32(split.logits)
    m = resolve_m(self.params["M"], logits.shape[1])
    return ops.as_np32(gen_scores(logits, float(self.params["gamma"]), m=m))
