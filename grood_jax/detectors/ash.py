"""ASH (Djurisic et al., 2023): activation shaping of the penultimate feature, then energy.

Per sample, keep the k = D - round(D p / 100) largest elements of h (ties: lower index) and
  'p' (ASH-P): zero the others;
  'b' (ASH-B): zero the others and set the kept ones to s1 / k, s1 = sum(h);
  's' (ASH-S): zero the others and scale by exp(s1 / s2), s2 = sum of the kept elements;
score = logsumexp(W h' + b). p = 90, variant 's'. At least one element is kept. Applied to
the pooled penultimate feature h (METHOD.md §4), not to the last convolutional feature map.

k and the variant are traced arguments (one compilation per feature shape for the whole
selection grid): the kept elements are the first k of lax.top_k over all D, and s2 is the sum
of those k values over a length-D row with the others zeroed, which can differ from a sum over
k values in the last bit (XLA's summation order depends on the length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors import common
from grood_jax.detectors.base import Detector, DetectorError, Param, register

VARIANTS = ("s", "b", "p")


def _variant_code(variant) -> int:
  if variant not in VARIANTS:
    raise DetectorError(f"ash: variant must be one of {VARIANTS}, got {variant!r}")
  return VARIANTS.index(variant)


@jax.jit
def _ash_shape(h_NxD, keep, code):
  """The shaped features h' (N, D); `keep` (>= 1) and `code` (index into VARIANTS) are traced,
  so one compilation per shape serves every grid point. The kept elements are the first
  `keep` of the full descending order (lax.top_k over all D: ties to the lower index, the same
  elements as lax.top_k(h, keep))."""
  d = h_NxD.shape[1]
  vals_NxD, idx_NxD = jax.lax.top_k(h_NxD, d)
  kept_NxD = jnp.arange(d)[None, :] < keep
  zeros = jnp.zeros_like(vals_NxD)
  s1 = jnp.sum(h_NxD, axis=1, keepdims=True)
  pruned = jnp.where(kept_NxD, vals_NxD, zeros)                      # 'p'
  binary = jnp.where(kept_NxD, s1 / keep.astype(h_NxD.dtype), zeros)  # 'b'
  s2 = jnp.sum(pruned, axis=1, keepdims=True)
  scaled = jnp.where(kept_NxD, vals_NxD * jnp.exp(s1 / jnp.where(s2 != 0, s2, 1.0)), zeros)  # 's'
  out_NxD = jnp.where(code == 0, scaled, jnp.where(code == 1, binary, pruned))
  rows = jnp.arange(h_NxD.shape[0])[:, None]
  return jnp.zeros_like(h_NxD).at[rows, idx_NxD].set(out_NxD)


def ash_shape(h_NxD, *, keep, variant):
  """The shaped features h' (N, D)."""
  return _ash_shape(h_NxD, np.int32(keep), np.int32(_variant_code(variant)))


@jax.jit
def _ash_scores(h_NxD, w_CxD, b_C, keep, code):
  return ops.energy_score(ops.affine(_ash_shape(h_NxD, keep, code), w_CxD, b_C))


def ash_scores(h_NxD, w_CxD, b_C, *, keep, variant):
  """logsumexp(W h' + b) (N,); keep and variant are traced (no recompilation per grid point)."""
  return _ash_scores(h_NxD, w_CxD, b_C, np.int32(keep), np.int32(_variant_code(variant)))


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
