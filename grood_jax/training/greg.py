"""GReg: energy-margin and input-gradient regularised training loss (METHOD.md §2, seed 001).

Pure functions; the training loop wires them in. With the energy S(x) = −logsumexp f(x)
(low = ID):

  L = CE(x_in, y_in) + λ_S · L_S + λ_∇ · L_∇
  L_S = E_in[relu(S(x_in) − m_in)²] + E_aux[relu(m_out − S(x_aux))²]
  L_∇ = E_in ‖1[S(x_in) ≤ m_in] · ∇_x S(x_in)‖₂ + E_aux ‖1[S(x_aux) ≥ m_out] · ∇_x S(x_aux)‖₂

Only samples already on the right side of their margin are smoothed; the masks are constants
(stop_gradient). The per-sample input gradients are `jax.vmap(jax.grad(S ∘ model_fn(params, ·)))`
and the loss is differentiated w.r.t. params through them (double backprop), so
`jax.grad(lambda p: greg_loss(model_fn, p, ...)[0])` works and jits.

`model_fn(params, x_BxHxWxC) -> logits_BxC` must be pure. The logits come from one call on the
concatenated batch [x_in; x_aux] (as in energy-based outlier exposure, so a train-mode BatchNorm
sees both). The input gradients:
  input_grad="vmap" (default): `vmap(grad)` of one sample at a time through `model_fn(params,
    x[None])` — the exact per-sample gradient for a model whose samples do not interact (eval-mode
    BatchNorm, no BatchNorm). A train-mode BatchNorm on a batch of one is degenerate: do not use
    "vmap" with it.
  input_grad="sum": the gradient of Σ_i S(x_i) over the batch in one backward pass. Equal to
    "vmap" when samples do not interact (∂S_j/∂x_i = 0 for j ≠ i), one pass instead of B;
    with a train-mode BatchNorm it also carries the (O(1/B)) paths through the batch statistics.
The norm is a safe norm (gradient 0, not NaN, at a zero vector).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def energy(logits_BxC: jax.Array) -> jax.Array:
  """S = −logsumexp f (low = ID)."""
  return -jax.nn.logsumexp(logits_BxC, axis=-1)


def safe_norm(x_BxD: jax.Array) -> jax.Array:
  """Row L2 norms with a finite (zero) gradient at a zero row."""
  sq = jnp.sum(jnp.square(x_BxD), axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def energy_margin_loss(s_in_B, s_aux_A, m_in: float = -25.0, m_out: float = -7.0):
  """L_S = E_in[relu(S_in − m_in)²] + E_aux[relu(m_out − S_aux)²]."""
  return (jnp.mean(jnp.square(jax.nn.relu(s_in_B - m_in)))
          + jnp.mean(jnp.square(jax.nn.relu(m_out - s_aux_A))))


def input_grad_norms(model_fn: Callable, params, x_BxHxWxC, *, input_grad: str = "vmap"):
  """‖∇_x S(x_i)‖₂ per sample (B,), differentiable w.r.t. params."""
  if input_grad == "vmap":
    def s_one(x):
      return energy(model_fn(params, x[None]))[0]
    g = jax.vmap(jax.grad(s_one))(x_BxHxWxC)
  elif input_grad == "sum":
    g = jax.grad(lambda x: jnp.sum(energy(model_fn(params, x))))(x_BxHxWxC)
  else:
    raise ValueError(f"input_grad must be 'vmap' or 'sum', got {input_grad!r}")
  return safe_norm(g.reshape(g.shape[0], -1))


def greg_loss(model_fn: Callable, params, x_in, y_in, x_aux, *, m_in: float = -25.0,
              m_out: float = -7.0, lam_s: float = 0.1, lam_grad: float = 1.0,
              input_grad: str = "vmap") -> tuple[jax.Array, dict]:
  """(total, {"ce", "l_s", "l_grad", "s_in", "s_aux", "frac_in", "frac_aux", "logits_in"}).

  frac_in / frac_aux: the fraction of samples whose gradient is regularised (masks on).
  """
  b = x_in.shape[0]
  logits = model_fn(params, jnp.concatenate([x_in, x_aux], axis=0))
  logits_in, logits_aux = logits[:b], logits[b:]
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_in, y_in))
  s_in, s_aux = energy(logits_in), energy(logits_aux)
  l_s = energy_margin_loss(s_in, s_aux, m_in, m_out)
  mask_in = jax.lax.stop_gradient((s_in <= m_in).astype(s_in.dtype))
  mask_aux = jax.lax.stop_gradient((s_aux >= m_out).astype(s_aux.dtype))
  n_in = input_grad_norms(model_fn, params, x_in, input_grad=input_grad)
  n_aux = input_grad_norms(model_fn, params, x_aux, input_grad=input_grad)
  l_grad = jnp.mean(mask_in * n_in) + jnp.mean(mask_aux * n_aux)
  total = ce + lam_s * l_s + lam_grad * l_grad
  aux = {"ce": ce, "l_s": l_s, "l_grad": l_grad, "s_in": jnp.mean(s_in),
         "s_aux": jnp.mean(s_aux), "frac_in": jnp.mean(mask_in), "frac_aux": jnp.mean(mask_aux),
         "logits_in": logits_in}
  return total, aux
