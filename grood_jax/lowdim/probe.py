"""A linear probe on reduced gradients: BatchNorm (affine) + Linear, trained with CE.

  logits = ((z − μ_run) / sqrt(σ²_run + eps) · γ + β) W + b

Training (METHOD.md §3: 10 epochs, CE on the train labels): optax adam, minibatches of
`batch_size` from a fresh seeded permutation each epoch (the remainder of an epoch that does
not fill a batch is dropped; reshuffling covers it in other epochs), BatchNorm on batch
statistics with running averages (momentum 0.9) used at evaluation. The whole run is one
`jax.jit` (`lax.scan` over epochs and steps). Learning rate 1e-2 is our choice (the paper does
not give one): a linear model on batch-normalised inputs, trained for only 10 epochs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

BN_EPS = 1e-5
HIGHEST = jax.lax.Precision.HIGHEST


def init_probe(key, dim: int, num_classes: int) -> dict:
  """Probe state: {"params": {scale, bias, w_KxC, b_C}, "stats": {mean, var}}."""
  w = jax.random.normal(key, (dim, num_classes), jnp.float32) / np.sqrt(dim)
  return {"params": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,)), "w_KxC": w,
                     "b_C": jnp.zeros((num_classes,))},
          "stats": {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))}}


def _apply(params, mean_K, var_K, z_NxK):
  zn = (z_NxK - mean_K) / jnp.sqrt(var_K + BN_EPS) * params["scale"] + params["bias"]
  return jnp.matmul(zn, params["w_KxC"], precision=HIGHEST) + params["b_C"]


@jax.jit
def probe_logits(state: dict, z_NxK) -> jax.Array:
  """Eval-mode logits (running BatchNorm statistics)."""
  return _apply(state["params"], state["stats"]["mean"], state["stats"]["var"],
                jnp.asarray(z_NxK, jnp.float32))


@jax.jit
def probe_loss(state: dict, z_NxK, labels_N) -> jax.Array:
  """Eval-mode mean cross-entropy."""
  logits = probe_logits(state, z_NxK)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels_N))


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size", "lr",
                                             "momentum"))
def _train(key, z_NxK, labels_N, *, num_classes, epochs, batch_size, lr, momentum):
  n, dim = z_NxK.shape
  steps = n // batch_size
  k_init, k_perm = jax.random.split(key)
  state = init_probe(k_init, dim, num_classes)
  opt = optax.adam(lr)
  opt_state = opt.init(state["params"])

  def loss_fn(params, zb, yb):
    mu = jnp.mean(zb, axis=0)
    var = jnp.var(zb, axis=0)
    logits = _apply(params, mu, var, zb)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
    return loss, (mu, var)

  def step(carry, idx_B):
    params, stats, opt_state = carry
    zb, yb = z_NxK[idx_B], labels_N[idx_B]
    (loss, (mu, var)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, zb, yb)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    unbiased = var * batch_size / max(batch_size - 1, 1)
    stats = {"mean": momentum * stats["mean"] + (1 - momentum) * mu,
             "var": momentum * stats["var"] + (1 - momentum) * unbiased}
    return (params, stats, opt_state), loss

  def epoch(carry, k):
    perm = jax.random.permutation(k, n)[:steps * batch_size].reshape(steps, batch_size)
    carry, losses = jax.lax.scan(step, carry, perm)
    return carry, jnp.mean(losses)

  (params, stats, _), losses_E = jax.lax.scan(
      epoch, (state["params"], state["stats"], opt_state), jax.random.split(k_perm, epochs))
  return {"params": params, "stats": stats}, losses_E


def train_probe(z_NxK, labels_N, num_classes: int, *, seed: int = 0, epochs: int = 10,
                batch_size: int = 128, lr: float = 1e-2, momentum: float = 0.9
                ) -> tuple[dict, np.ndarray]:
  """Trains the probe; returns (state, mean train loss per epoch as numpy (epochs,))."""
  z_NxK = jnp.asarray(z_NxK, jnp.float32)
  labels_N = jnp.asarray(labels_N, jnp.int32)
  n = z_NxK.shape[0]
  if n < 2:
    raise ValueError("train_probe: needs at least 2 samples")
  bs = int(max(2, min(batch_size, n)))
  state, losses = _train(jax.random.key(seed), z_NxK, labels_N, num_classes=int(num_classes),
                         epochs=int(epochs), batch_size=bs, lr=float(lr),
                         momentum=float(momentum))
  return state, np.asarray(losses)
