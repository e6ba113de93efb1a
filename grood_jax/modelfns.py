"""Pure functions of a model's parameters, for jit / vmap / grad.

A Flax NNX module is stateful; detectors and gradient methods want pure functions
`fn(params, x)`. `ModelFns` splits a model (in eval mode) into a static graph definition and
a parameter pytree and exposes the backbone interface as pure functions:

  fns.early(params, x_BxHxWxC)     -> e_BxHexWexCe
  fns.from_early(params, e)        -> h_BxD
  fns.head(params, h_BxD)          -> f_BxC
  fns.forward(params, x)           -> (e, h, f)
  fns.logits(params, x)            -> f
  fns.early_shape(params, (H, W, C)) -> the early map's shape of one image (He, We, Ce)

`jit_forward`, `jit_from_early`, `jit_early_flat` are their jitted forms (built once per model).

`fns.params` holds the model's current parameters (and BatchNorm statistics).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from grood_jax import parallel


class ModelFns:
  """A model (set to eval mode) as pure functions of its parameters: `fns.forward(params, x)`
  -> (early, penultimate, logits), `early`, `from_early`, `head`, `logits`, and their jitted
  forms; `fns.params` holds the parameters (replicated inside `parallel.data_parallel`)."""

  def __init__(self, model: nnx.Module):
    model.eval()
    self.graphdef, params = nnx.split(model)
    self.params = parallel.put_params(params)   # replicated inside parallel.data_parallel
    self.num_classes = int(model.num_classes)
    self.feature_dim = int(model.feature_dim)
    self.in_channels = int(getattr(model, "in_channels", 1))

  def _merge(self, params):
    return nnx.merge(self.graphdef, params)

  def early(self, params, x):
    return self._merge(params).early(x)

  def from_early(self, params, e):
    return self._merge(params).from_early(e)

  def head(self, params, h):
    return self._merge(params).head(h)

  def forward(self, params, x):
    m = self._merge(params)
    e = m.early(x)
    h = m.from_early(e)
    return e, h, m.head(h)

  def logits(self, params, x):
    return self._merge(params)(x)

  def early_flat(self, params, x):
    e = self._merge(params).early(x)
    return e.reshape(e.shape[0], -1)

  def early_shape(self, params, image_shape: tuple) -> tuple:
    """Shape of one image's early feature map (no computation: `jax.eval_shape`)."""
    x0 = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jax.numpy.float32)
    return tuple(jax.eval_shape(lambda x: self.early(params, x), x0).shape[1:])

  @functools.cached_property
  def jit_early_flat(self):
    return jax.jit(self.early_flat)

  @functools.cached_property
  def jit_forward(self):
    return jax.jit(self.forward)

  @functools.cached_property
  def jit_from_early(self):
    return jax.jit(self.from_early)
