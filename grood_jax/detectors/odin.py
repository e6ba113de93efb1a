"""ODIN (Liang et al., 2018): temperature scaling and input pre-processing.

  y^ = argmax f(x),   x~ = x - (eps / std) * sign(grad_x [-log softmax(f(x) / T)_y^])
  score = max_c softmax(f(x~) / T)_c

The step increases the tempered softmax probability of the predicted class. x is the
normalised model input ((x/255 - mean) / std), so a step of eps in [0, 1] pixel units is
eps / std per channel there, as in OpenOOD. sign(0) = 0: an input element with zero gradient
is left as it is (OpenOOD maps it to +1). T = 1000, eps = 0.0014.

The model is re-run twice per image (forward + backward, then forward on x~) in fixed-size
padded batches of ctx.batch_size; the gradient is that of the batch sum, which is the
per-sample gradient because the model is in eval mode (samples do not interact). One
compilation per (fns, batch shape); T and eps are traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grood_jax import ops
from grood_jax.detectors.base import Detector, DetectorError, Param, register
from grood_jax.features import map_batched


def make_odin_fn(fns):
  """jit(params, x_BxHxWxC normalised, T, step) -> scores_B; step = eps / std (broadcast)."""

  @jax.jit
  def odin_batch(params, x, temperature, step):
    def nll_sum(x):
      f = fns.logits(params, x) / temperature
      y = jax.lax.stop_gradient(jnp.argmax(f, axis=-1))
      logp = jax.nn.log_softmax(f, axis=-1)
      return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=-1))

    g = jax.grad(nll_sum)(x)
    x_tilde = x - step * jnp.sign(g)
    return ops.max_softmax(fns.logits(params, x_tilde), temperature)

  return odin_batch


@register
class ODIN(Detector):
  name = "odin"
  defaults = {"T": 1000.0, "eps": 0.0014}
  specs = {"T": Param("float", lo=0, lo_open=True), "eps": Param("float", lo=0)}
  grid = {"T": [1.0, 10.0, 100.0, 1000.0], "eps": [0.0, 0.0014, 0.0028]}
  description = "max softmax at temperature T on a gradient-sign pre-processed input"

  def score(self, ctx, state, split) -> np.ndarray:
    if split.images is None:
      raise DetectorError(f"odin re-runs the model and needs the images of {split.name!r}")
    key = ("odin_fn", id(ctx.fns))
    if key not in ctx.cache:
      ctx.cache[key] = make_odin_fn(ctx.fns)
    fn = ctx.cache[key]
    temperature = jnp.float32(self.params["T"])
    step = jnp.asarray(float(self.params["eps"]) / np.asarray(ctx.std, np.float32), jnp.float32)
    out = map_batched(lambda x: fn(ctx.params, x, temperature, step), split.images,
                      mean=ctx.mean, std=ctx.std, batch_size=ctx.batch_size)
    return ops.as_np32(out)
