"""A small CNN for 28x28 grayscale images (Fashion-MNIST)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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
    return nnx.max_pool(x, (2, 2), strides=(2, 2))

  def _block2(self, e: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn3(self.conv3(e)))
    x = nnx.relu(self.bn4(self.conv4(x)))
    return nnx.max_pool(x, (2, 2), strides=(2, 2))

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
    return nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))

  def _block2(self, e: jax.Array) -> jax.Array:
    return nnx.max_pool(nnx.relu(self.conv2(e)), (2, 2), strides=(2, 2))

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
