"""ASH (Djurisic et al., 2023): activation shaping of the penultimate feature, then energy.

Per sample, keep the k = D - round(D p / 100) largest elements of h (ties: lower index) and
  'p' (ASH-P): zero the others;
  'b' (ASH-B): zero the others and set the kept ones to s1 / k, s1 = sum(h);
  's' (ASH-S): zero the others and scale by exp(s1 / s2), s2 = sum of the kept elements;
score = logsumexp(W h' + b). p = 90, variant 's'. At least one element is kept. Applied to
the pooled penultimate feature h (METHOD.md §4), not to the last convolutional feature map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, DetectorError, Param, register

VARIANTS = ("s", "b", "p")


@functools.partial(jax.jit, static_argnames=("keep", "variant"))
def ash_shape(h_NxD, *, keep, variant):
  """The shaped features h' (N, D)."""
  vals_NxK, idx_NxK = jax.lax.top_k(h_NxD, keep)
  s1 = jnp.sum(h_NxD, axis=1, keepdims=True)
  if variant == "b":
    vals_NxK = jnp.broadcast_to(s1 / keep, vals_NxK.shape)
  elif variant == "s":
    s2 = jnp.sum(vals_NxK, axis=1, keepdims=True)
    vals_NxK = vals_NxK * jnp.exp(s1 / jnp.where(s2 != 0, s2, 1.0))
  rows = jnp.arange(h_NxD.shape[0])[:, None]
  return jnp.zeros_like(h_NxD).at[rows, idx_NxK].set(vals_NxK)


@functools.partial(jax.jit, static_argnames=("keep", "variant"))
def ash_scores(h_NxD, w_CxD, b_C, *, keep, variant):
  return ops.energy_score(ops.affine(ash_shape(h_NxD, keep=keep, variant=variant), w_CxD, b_C))


def kept(dim: int, percentile: float) -> int:
  return max(1, dim - int(np.round(dim * percentile / 100.0)))


@register
class ASH(Detector):
  name = "ash"
  defaults = {"percentile": 90.0, "variant": "s"}
  specs = {"percentile": Param("float", lo=0, hi=100, hi_open=True),
           "variant": Param("str", choices=VARIANTS)}
  grid = {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0], "variant": list(VARIANTS)}
  description = "energy after keeping the top activations (ASH-S / -B / -P)"

  def fit(self, ctx) -> dict:
    if self.params["variant"] not in VARIANTS:
      raise DetectorError(f"ash: variant must be one of {VARIANTS}, got {self.params['variant']!r}")
    w, b = common.head_affine(ctx, "ash")
    return {"w_CxD": w, "b_C": b}

  def score(self, ctx, state, split) -> np.ndarray:
    variant = self.params["variant"]
    if variant not in VARIANTS:
      raise DetectorError(f"ash: variant must be one of {VARIANTS}, got {variant!r}")
    h = ops.as_np32(split.feats)
    return ops.as_np32(ash_scores(h, state["w_CxD"], state["b_C"],
                                      keep=kept(h.shape[1], float(self.params["percentile"])),
                                      variant=variant))
