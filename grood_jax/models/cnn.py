"""A small CNN for 28x28 grayscale images (Fashion-MNIST)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _window_mask(x: jax.Array, y: jax.Array):
  """(x cropped and split into 2x2 windows (B, H/2, 2, W/2, 2, C), where it equals its window's
  max y, and 1 / the number of such places per window)."""
  b, h, w, c = x.shape
  xr = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  hit = xr == y[:, :, None, :, None, :]
  inv = 1.0 / jnp.sum(hit, axis=(2, 4), dtype=x.dtype)
  return hit, inv


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2, VALID: `nnx.max_pool(x, (2, 2), strides=(2, 2))` (an odd
  last row / column dropped), the same forward values, with a cheaper derivative.

  XLA:CPU differentiates `reduce_window` max through a variadic reduce-window that carries
  the argmax's indices (four int32 index maps the size of the pooled input per pool): in the
  SmallCNN training step (width 16, batch 128) that index tracking took about 17 % of the
  CPU time (jax.profiler trace, 2026-12-02). Here the derivative is elementwise instead: the
  tangent of a window's max is the mean of the input's tangents where the input equals that
  max (the tangent itself where the max is unique, which is where the two agree; ties are
  split evenly instead of going to the first). The JVP is
  linear in the tangent, so reverse mode (and reverse over reverse) transposes it into a mask.
  After a ReLU the ties are zeros, whose gradient the ReLU zeroes either way. The forward pass
  is still `reduce_window` (faster on CPU than a max over reshaped axes).
  """
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = max_pool_2x2(x)
  hit, inv = _window_mask(x, y)
  b, h, w, c = t.shape
  tr = t[:, :h // 2 * 2, :w // 2 * 2].reshape(hit.shape)
  return y, jnp.sum(jnp.where(hit, tr, 0), axis=(2, 4)) * inv


class SmallCNN(nnx.Module):
  """conv-conv-pool | conv-conv-pool-conv-GAP | dense.

  Backbone interface shared by every model of grood_jax:
    early(x)      -> e   early feature map (B, 14, 14, width), after the first block
    from_early(e) -> h   penultimate feature (B, feature_dim), post-ReLU, global-average-pooled
    head(h)       -> f   logits (B, num_classes)
    __call__(x)   == head(from_early(early(x)))
  Named split points (GROOD's mix-up layer, the reference's `pre_layer_indx`):
    split_points()          -> ("block1", "block2"); "block1" is `early` (14x14xwidth), "block2"
                               the map after the second block (7x7x2width)
    features_at(name, x)    -> the feature map at that split point
    forward_from(name, z)   -> penultimate h from a map at that split point
  features_at("block1") / forward_from("block1") run the same operations as early / from_early.
  BatchNorm follows the module's train/eval mode (`model.train()` / `model.eval()`).
  """

  SPLIT_POINTS = ("block1", "block2")

  def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32,
               feature_dim: int = 128, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.feature_dim = feature_dim
    self.in_channels = in_channels
    w = width
    self.conv1 = nnx.Conv(in_channels, w, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(w, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(w, w, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(w, momentum=0.9, rngs=rngs)
    self.conv3 = nnx.Conv(w, 2 * w, (3, 3), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(2 * w, momentum=0.9, rngs=rngs)
    self.conv4 = nnx.Conv(2 * w, 2 * w, (3, 3), use_bias=False, rngs=rngs)
    self.bn4 = nnx.BatchNorm(2 * w, momentum=0.9, rngs=rngs)
    self.conv5 = nnx.Conv(2 * w, feature_dim, (3, 3), use_bias=False, rngs=rngs)
    self.bn5 = nnx.BatchNorm(feature_dim, momentum=0.9, rngs=rngs)
    self.fc = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def early(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return max_pool_2x2(x)

  def _block2(self, e: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn3(self.conv3(e)))
    x = nnx.relu(self.bn4(self.conv4(x)))
    return max_pool_2x2(x)

  def _tail(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn5(self.conv5(x)))
    return jnp.mean(x, axis=(1, 2))

  def from_early(self, e: jax.Array) -> jax.Array:
    return self._tail(self._block2(e))

  def split_points(self) -> tuple:
    return self.SPLIT_POINTS

  def features_at(self, name: str, x: jax.Array) -> jax.Array:
    e = self.early(x)
    if name == "block1":
      return e
    if name == "block2":
      return self._block2(e)
    raise ValueError(f"unknown split point {name!r}; choose from {self.SPLIT_POINTS}")

  def forward_from(self, name: str, z: jax.Array) -> jax.Array:
    if name == "block1":
      return self.from_early(z)
    if name == "block2":
      return self._tail(z)
    raise ValueError(f"unknown split point {name!r}; choose from {self.SPLIT_POINTS}")

  def head(self, h: jax.Array) -> jax.Array:
    return self.fc(h)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.from_early(self.early(x)))


class DenseCNN(nnx.Module):
  """Two conv layers and a dense penultimate layer (the classic MNIST-tutorial CNN).

  conv(width)-ReLU-pool | conv(2·width)-ReLU-pool-flatten-dense(feature_dim)-ReLU | dense.
  No BatchNorm. The penultimate feature is the post-ReLU dense layer (no global pooling), as
  in the independent minimal implementation the foundation issue quotes as a reference point.
  Split points: "block1" (= early, after conv1-pool) and "block2" (after conv2-pool, before
  the dense layer); see SmallCNN.
  """

  SPLIT_POINTS = ("block1", "block2")

  def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32,
               feature_dim: int = 128, image_size: int = 28, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.feature_dim = feature_dim
    self.in_channels = in_channels
    self.conv1 = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
    side = image_size // 4
    self.fc1 = nnx.Linear(side * side * 2 * width, feature_dim, rngs=rngs)
    self.fc = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def early(self, x: jax.Array) -> jax.Array:
    return max_pool_2x2(nnx.relu(self.conv1(x)))

  def _block2(self, e: jax.Array) -> jax.Array:
    return max_pool_2x2(nnx.relu(self.conv2(e)))

  def _tail(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))

  def from_early(self, e: jax.Array) -> jax.Array:
    return self._tail(self._block2(e))

  split_points = SmallCNN.split_points
  features_at = SmallCNN.features_at
  forward_from = SmallCNN.forward_from

  def head(self, h: jax.Array) -> jax.Array:
    return self.fc(h)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.from_early(self.early(x)))
