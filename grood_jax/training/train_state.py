"""Optimizer, jitted train step and evaluation.

The step is a pure function of a pytree: `nnx.split((model, optimizer))` gives a static graph
definition and a state (parameters, BatchNorm statistics, optimizer state); the step merges,
differentiates, updates and splits again inside one `jax.jit`, with the state donated. This is
the low-overhead form of `nnx.jit` (no graph traversal on every call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from grood_jax import parallel


def learning_rate_schedule(config, steps_total: int) -> optax.Schedule:
  """Linear warmup for `config.warmup_epochs` (in steps) then cosine decay to 0."""
  steps_per_epoch = max(1, steps_total // max(1, config.num_epochs))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(0, steps_total - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(steps_total, warmup + 1), end_value=0.0)


def _kernels_only(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, steps_total: int) -> optax.GradientTransformation:
  """optax adamw, or sgd + (nesterov) momentum, on a warmup-cosine schedule.

  Weight decay applies to kernels (ndim > 1), not to biases or BatchNorm scales.
  """
  schedule = learning_rate_schedule(config, steps_total)
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=_kernels_only)
  if config.optimizer == "sgd":
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_kernels_only),
        optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  raise ValueError(f"unknown optimizer {config.optimizer!r}; choose 'adamw' or 'sgd'")


def make_train_step(graphdef, loss_fn, *, select_fn=None, seed: int = 0,
                    return_metrics: bool = False, return_grad_norm: bool = False, mesh=None):
  """Returns `step(state, x, y, *aux) -> (state, loss, accuracy[, metrics][, grad_norm])`,
  jitted, state donated.

  `mesh` (a 1-D `jax.sharding.Mesh`, see grood_jax.parallel): data-parallel training. The
  state must be replicated over the mesh (`parallel.replicate`) and stays so; x, y and aux
  (numpy, the global batch, a multiple of the device count) are split over the mesh axis, and
  XLA inserts the gradient all-reduce. BatchNorm statistics, the loss means and GReg+'s
  k-means are over the whole global batch, so the step equals the one-device step up to float
  summation order. On a 1-device mesh it is the one-device step.

  `graphdef` comes from `nnx.split((model, optimizer))` with the model in train mode. `aux` is
  passed on to `loss_fn(model, x, y, *aux)` (e.g. an auxiliary outlier batch). With
  `select_fn(model, pool, key) -> x_aux` the one aux argument is a candidate pool and the step
  first selects the batch from it (GReg+), with key = fold_in(key(seed), optimizer step) — a
  pure function of the seed and the step, so a resumed run selects the same batches.
  `metrics`: the scalar entries of a dict-valued loss output (empty for a logits output).
  `return_grad_norm=True` adds the global L2 norm of the loss gradient (before the optimizer's
  weight decay / momentum), computed inside the same jitted step: an extra output, not an
  extra host round trip; the update itself is unchanged.
  """
  base_key = jax.random.fold_in(jax.random.key(seed), 0x5e1ec7)

  def step(state, x, y, *aux):
    model, optimizer = nnx.merge(graphdef, state)
    if select_fn is not None:
      (pool,) = aux
      key = jax.random.fold_in(base_key, optimizer.step[...])
      aux = (select_fn(model, pool, key),)
    (loss, out), grads = nnx.value_and_grad(
        lambda m: loss_fn(m, x, y, *aux), has_aux=True)(model)
    optimizer.update(model, grads)
    if isinstance(out, dict):
      logits = out["logits"]
      metrics = {k: v for k, v in out.items() if k != "logits"}
    else:
      logits, metrics = out, {}
    acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    new_state = nnx.state((model, optimizer))
    if mesh is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, NamedSharding(mesh, P()))
    out = (new_state, loss, acc)
    if return_metrics:
      out += (metrics,)
    if return_grad_norm:
      out += (optax.tree.norm(grads),)
    return out

  jitted = jax.jit(step, donate_argnums=0)
  if mesh is None:
    return jitted

  def data_parallel_step(state, x, y, *aux):
    return jitted(state, *(parallel.global_batch(a, mesh) for a in (x, y, *aux)))

  data_parallel_step.jitted = jitted
  return data_parallel_step


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree) -> bool:
  """True when every floating-point array of `tree` (e.g. a model/optimizer state) is finite
  (one jitted reduction, one host sync)."""
  return bool(_all_finite(tree))


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(graphdef, state, x_u8, y, valid, mean, std):
  model = nnx.merge(graphdef, state)
  logits = model((x_u8.astype(jnp.float32) / 255.0 - mean) / std)   # as data.normalize
  correct = (jnp.argmax(logits, -1) == y) & valid
  return jnp.sum(correct.astype(jnp.int32))


def evaluate(model: nnx.Module, images_u8: np.ndarray, labels: np.ndarray, *, mean, std,
             batch_size: int = 500) -> float:
  """Top-1 accuracy of `model` (put in eval mode) on uint8 images.

  Batches are padded to `batch_size` so the evaluation compiles once per image shape.
  """
  n = len(images_u8)
  if n == 0:
    return float("nan")
  model.eval()
  graphdef, state = nnx.split(model)
  batch_size = min(batch_size, n)
  mean32 = jnp.asarray(mean, jnp.float32)
  std32 = jnp.asarray(std, jnp.float32)
  correct = 0
  for start in range(0, n, batch_size):
    x = images_u8[start:start + batch_size]
    y = labels[start:start + batch_size].astype(np.int32)
    k = len(x)
    if k < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(batch_size - k, np.int32)])
    valid = np.arange(batch_size) < k
    correct += _eval_batch(graphdef, state, x, y, valid, mean32, std32)
  return float(int(correct) / n)
