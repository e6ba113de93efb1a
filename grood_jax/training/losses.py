"""Training losses, selected by `config.loss`.

A loss factory takes the config and returns `loss_fn(model, x_BxHxWxC, y_B) -> (loss, logits)`;
the train step differentiates it w.r.t. the model's parameters (BatchNorm statistics update
as a side effect). Register more with `register_loss(name, factory)`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (optional label smoothing)."""
  num_classes = logits_BxC.shape[-1]
  onehot = jax.nn.one_hot(labels_B, num_classes, dtype=logits_BxC.dtype)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits_BxC, onehot))


def _ce_factory(config) -> LossFn:
  smoothing = float(config.get("label_smoothing", 0.0))

  def loss_fn(model, x, y):
    logits = model(x)
    return cross_entropy(logits, y, smoothing), logits
  return loss_fn


_LOSSES: dict[str, Callable[..., LossFn]] = {"ce": _ce_factory}


def register_loss(name: str, factory: Callable[..., LossFn]) -> None:
  _LOSSES[name] = factory


def make_loss(config) -> LossFn:
  if config.loss not in _LOSSES:
    raise ValueError(f"unknown loss {config.loss!r}; choose one of {sorted(_LOSSES)}")
  return _LOSSES[config.loss](config)
