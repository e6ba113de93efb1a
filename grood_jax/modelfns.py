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

Named split points (GROOD's mix-up layer; additions, the functions above are unchanged):

  fns.split_points                       -> the model's names, e.g. ("block1", "block2"); a
                                            model without `split_points()` has ("early",)
  fns.resolve_split(name)                -> "early" means the first split point (= `early`)
  fns.features_at(params, name, x)       -> the map at that split point
  fns.forward_from(params, name, z)      -> penultimate h from a map at that split point
  fns.split_shape(params, name, (H, W, C)) -> one image's map shape at that split point
  fns.jit_features_flat(name) / fns.jit_forward_from(name) -> jitted forms (cached per name)

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
    self.split_points = (tuple(model.split_points()) if hasattr(model, "split_points")
                         else ("early",))
    self._jits = {}

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

  # -- named split points (GROOD's mix-up layer) ----------------------------------------------

  def resolve_split(self, name: str) -> str:
    """The split point's model name; "early" is the first one (the model's `early`)."""
    if name == "early":
      return self.split_points[0]
    if name not in self.split_points:
      raise ValueError(f"unknown split point {name!r}; this model has {self.split_points} "
                       "(or 'early' for the first)")
    return name

  def features_at(self, params, name, x):
    name = self.resolve_split(name)
    m = self._merge(params)
    return m.early(x) if not hasattr(m, "features_at") else m.features_at(name, x)

  def forward_from(self, params, name, z):
    name = self.resolve_split(name)
    m = self._merge(params)
    return m.from_early(z) if not hasattr(m, "forward_from") else m.forward_from(name, z)

  def split_shape(self, params, name: str, image_shape: tuple) -> tuple:
    """Shape of one image's feature map at split point `name` (`jax.eval_shape`)."""
    x0 = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jax.numpy.float32)
    return tuple(jax.eval_shape(lambda x: self.features_at(params, name, x), x0).shape[1:])

  def jit_features_flat(self, name: str):
    key = ("features_flat", self.resolve_split(name))
    if key not in self._jits:
      def fn(params, x, _n=key[1]):
        e = self.features_at(params, _n, x)
        return e.reshape(e.shape[0], -1)
      self._jits[key] = jax.jit(fn)
    return self._jits[key]

  def jit_forward_from(self, name: str):
    key = ("forward_from", self.resolve_split(name))
    if key not in self._jits:
      self._jits[key] = jax.jit(lambda params, z, _n=key[1]: self.forward_from(params, _n, z))
    return self._jits[key]
