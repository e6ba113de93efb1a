"""The nearest-class-prototype (NCP) loss and GROOD's per-sample gradients.

Over the C+1 prototypes P = (p_1 .. p_C, p_ood), with temperature tau (METHOD.md: tau = 1):

  s_j(h)     = -||h - p_j||_2 / tau                   (Euclidean, not squared)
  L(h, P, y) = -s_y + log sum_j exp(s_j)              y = the classifier's prediction

Gradients (pi = softmax(s), y a class index, never the OOD index):

  dL/dp_ood = (pi_ood / tau) * (h - p_ood) / ||h - p_ood||
      Derivation: only s_ood depends on p_ood and y != ood, so dL/dp_ood = pi_ood * ds_ood/dp_ood;
      d||h - p||/dp = -(h - p)/||h - p||, hence ds_ood/dp_ood = (h - p_ood) / (tau ||h - p_ood||).
      It does not depend on y, and its norm is pi_ood / tau (= pi_ood at tau = 1).
  dL/dp_y   = ((pi_y - 1) / tau) * (h - p_y) / ||h - p_y||       (the wrt="class" variant)

The reference's `distance_loss` variant (loss="distance") replaces L by the mean NCP logit,
  L_dist(h, P) = mean_j s_j = -(1 / P) sum_j ||h - p_j|| / tau,
so dL_dist/dp_ood = (h - p_ood) / (P tau ||h - p_ood||) and dL_dist/dp_y = (h - p_y) /
(P tau ||h - p_y||): unit vectors scaled by 1 / (P tau), no softmax.

At h == p the Euclidean norm has no gradient (NaN through sqrt); `safe_norm` makes it zero,
so the gradient is 0 there, which is also the closed form's limit convention below.

`prototype_grads` is `jax.vmap(jax.grad(ncp_loss))` inside one `jax.jit`; the closed forms
serve tests and a fast path (`method="closed_form"`). `batched_grads` runs either over any
number of samples in fixed-size padded batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax.features import Rows, map_arrays
from grood_jax.ops import pairwise_sq_dists, safe_norm  # noqa: F401  (safe_norm: part of the maths)

WRT = ("ood", "class")
METHODS = ("autodiff", "closed_form")
LOSSES = ("ncp", "distance")


def ncp_logits(h_D, protos_PxD, tau=1.0):
  """s_j = -||h - p_j|| / tau for every prototype: (P,)."""
  return -safe_norm(h_D[None, :] - protos_PxD) / tau


def ncp_loss(h_D, protos_PxD, target, tau=1.0):
  """-s_target + logsumexp(s): scalar."""
  s_P = ncp_logits(h_D, protos_PxD, tau)
  return jax.nn.logsumexp(s_P) - s_P[target]


def _check(wrt: str, method: str = "autodiff", kind: str = "ncp"):
  if kind not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
  if wrt not in WRT:
    raise ValueError(f"wrt must be one of {WRT}, got {wrt!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def pairwise_dists(h_BxD, protos_PxD):
  """||h_b - p_j|| for every pair, as sqrt(||h||^2 - 2 h.p + ||p||^2) with one matmul (B, P).

  No (B, P, D) difference tensor: B*P*D multiply-adds in one BLAS call instead of an
  elementwise pass over B*P*D values. Squared distances are clamped at 0. The cancellation
  error (~1e-7 * ||h||^2) only enters the softmax over the prototypes; the distance a gradient
  divides by is taken from the explicit difference (see `_prototype_grads`).
  """
  return jnp.sqrt(pairwise_sq_dists(h_BxD, protos_PxD))


def ncp_loss_from_dists(dists_P, target, tau=1.0):
  """The NCP loss given the distances to the P prototypes: logsumexp(-d/tau) + d_target/tau."""
  s_P = -dists_P / tau
  return jax.nn.logsumexp(s_P) - s_P[target]


def distance_loss_from_dists(dists_P, target, tau=1.0):
  """The reference's distance_loss: the mean NCP logit -mean(d) / tau (target unused)."""
  del target
  return jnp.mean(-dists_P / tau)


def _loss_fn(kind):
  return ncp_loss_from_dists if kind == "ncp" else distance_loss_from_dists


@functools.partial(jax.jit, static_argnames=("wrt", "kind"))
def _prototype_grads(feats_BxD, class_protos_CxD, ood_proto_D, targets_B, tau, wrt,
                     kind="ncp"):
  # The distances to the prototypes that are not differentiated come from one matmul
  # (`pairwise_dists`) outside the per-sample grad; inside `vmap(grad)` only the one
  # differentiated prototype's distance is a (D,) difference. Same loss as `ncp_loss`.
  dclass_BxC = pairwise_dists(feats_BxD, class_protos_CxD)
  if wrt == "ood":
    def loss(ood_D, h_D, t, dc_C):
      d_P = jnp.concatenate([dc_C, safe_norm(h_D - ood_D)[None]])
      return _loss_fn(kind)(d_P, t, tau)
    return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(ood_proto_D, feats_BxD, targets_B,
                                                             dclass_BxC)

  dood_B = safe_norm(feats_BxD - ood_proto_D[None, :])

  def loss(p_D, h_D, t, dc_C, do):                    # wrt == "class": d/dp_target
    d_P = jnp.concatenate([dc_C.at[t].set(safe_norm(h_D - p_D)), do[None]])
    return _loss_fn(kind)(d_P, t, tau)
  return jax.vmap(jax.grad(loss))(class_protos_CxD[targets_B], feats_BxD, targets_B, dclass_BxC,
                                  dood_B)


def prototype_grads(feats_BxD, class_protos_CxD, ood_proto_D, targets_B, *, wrt="ood", tau=1.0,
                    loss="ncp"):
  """Per-sample gradient of the NCP loss (loss="ncp") or the reference's distance loss
  ("distance") w.r.t. p_ood (wrt="ood") or p_target ("class"): (B, D).

  targets_B are class indices in [0, C) (the classifier's predictions).
  Memory: B*(C+1) distances (one matmul) and B*D for the differentiated difference.
  """
  _check(wrt, kind=loss)
  return _prototype_grads(jnp.asarray(feats_BxD, jnp.float32),
                           jnp.asarray(class_protos_CxD, jnp.float32),
                           jnp.asarray(ood_proto_D, jnp.float32),
                           jnp.asarray(targets_B, jnp.int32), jnp.float32(tau), wrt=wrt,
                           kind=loss)


@functools.partial(jax.jit, static_argnames=("wrt", "kind"))
def _closed_form(feats_BxD, class_protos_CxD, ood_proto_D, targets_B, tau, wrt, kind="ncp"):
  protos_PxD = jnp.concatenate([class_protos_CxD, ood_proto_D[None, :]], axis=0)
  b = jnp.arange(feats_BxD.shape[0])
  col_B = jnp.full_like(targets_B, class_protos_CxD.shape[0]) if wrt == "ood" else targets_B
  d_BxD = feats_BxD - protos_PxD[col_B]               # the differentiated prototype, exactly
  n_B = safe_norm(d_BxD)
  dist_BxP = pairwise_dists(feats_BxD, protos_PxD).at[b, col_B].set(n_B)
  pi_BxP = jax.nn.softmax(-dist_BxP / tau, axis=-1)
  if kind == "distance":
    coef_B = jnp.full_like(n_B, 1.0) / (protos_PxD.shape[0] * tau)
  else:
    coef_B = pi_BxP[b, col_B] / tau if wrt == "ood" else (pi_BxP[b, col_B] - 1.0) / tau
  unit_BxD = jnp.where(n_B[:, None] > 0, d_BxD / jnp.where(n_B > 0, n_B, 1.0)[:, None], 0.0)
  return coef_B[:, None] * unit_BxD


def closed_form_grad_ood(feats_BxD, class_protos_CxD, ood_proto_D, *, tau=1.0):
  """(pi_ood / tau) * (h - p_ood) / ||h - p_ood||, 0 where h == p_ood: (B, D)."""
  b = jnp.zeros((np.shape(feats_BxD)[0],), jnp.int32)
  return _closed_form(jnp.asarray(feats_BxD, jnp.float32), jnp.asarray(class_protos_CxD, jnp.float32),
                      jnp.asarray(ood_proto_D, jnp.float32), b, jnp.float32(tau), wrt="ood")


def closed_form_grad_class(feats_BxD, class_protos_CxD, ood_proto_D, targets_B, *, tau=1.0):
  """((pi_y - 1) / tau) * (h - p_y) / ||h - p_y||, 0 where h == p_y: (B, D)."""
  return _closed_form(jnp.asarray(feats_BxD, jnp.float32), jnp.asarray(class_protos_CxD, jnp.float32),
                      jnp.asarray(ood_proto_D, jnp.float32), jnp.asarray(targets_B, jnp.int32),
                      jnp.float32(tau), wrt="class")


def default_batch_size(num_protos: int, dim: int, max_elems: int = 1 << 24) -> int:
  """Largest power-of-two batch (16 .. 4096) whose B*(P + 4*D) live values stay under
  max_elems (64 MiB of float32: the distances and a few (B, D) arrays)."""
  bs = 4096
  while bs > 16 and bs * (num_protos + 4 * dim) > max_elems:
    bs //= 2
  return bs


def batched_grads(feats_NxD, class_protos_CxD, ood_proto_D, targets_N, *, wrt="ood", tau=1.0,
                  method="autodiff", batch_size: int | None = None,
                  loss: str = "ncp", progress=None) -> np.ndarray:
  """Per-sample gradients of N samples in fixed-size padded batches: numpy float32 (N, D).

  Every batch has the same shape, so the jitted gradient compiles once. loss="distance": the
  reference's distance_loss (see the module docstring). `progress(n)` is called after each
  batch with its number of samples.
  """
  _check(wrt, method, loss)
  if not isinstance(feats_NxD, Rows):                  # a Rows subset is read batch by batch
    feats_NxD = np.asarray(feats_NxD, np.float32)
  targets_N = np.asarray(targets_N, np.int32)
  n, d = feats_NxD.shape
  if n == 0:
    return np.zeros((0, d), np.float32)
  protos = jnp.asarray(class_protos_CxD, jnp.float32)
  ood = jnp.asarray(ood_proto_D, jnp.float32)
  fn = _prototype_grads if method == "autodiff" else _closed_form
  return map_arrays(lambda h, t: fn(h, protos, ood, t, jnp.float32(tau), wrt=wrt, kind=loss),
                    feats_NxD, targets_N, progress=progress,
                    batch_size=batch_size or default_batch_size(protos.shape[0] + 1, d))


def prototype_distance_scores(feats_NxD, class_protos_CxD, ood_proto_D, targets_N, *,
                              wrt: str = "ood") -> np.ndarray:
  """The reference's no_gradients scores, no bank: ||h - p_ood|| (wrt="ood": far from the OOD
  prototype = ID) or -||h - p_target|| (wrt="class"): numpy float32 (N,), higher = more ID."""
  _check(wrt)
  h = jnp.asarray(feats_NxD, jnp.float32)
  if wrt == "ood":
    return np.asarray(safe_norm(h - jnp.asarray(ood_proto_D, jnp.float32)[None]), np.float32)
  p = jnp.asarray(class_protos_CxD, jnp.float32)[jnp.asarray(targets_N, jnp.int32)]
  return np.asarray(-safe_norm(h - p), np.float32)
