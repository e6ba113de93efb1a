"""ResNet-18 (32x32, CIFAR/OpenOOD style) and ResNet-50 (torchvision layout) in Flax NNX.

Both follow the backbone interface of grood_jax (see cnn.py):
  early(x)      -> e   feature map after the first stage (layer1)
  from_early(e) -> h   penultimate feature (B, feature_dim), post-ReLU, global-average-pooled
  head(h)       -> f   logits (B, num_classes)
  __call__(x)   == head(from_early(early(x)))
  split_points() -> ("layer1", "layer2", "layer3"): the maps after each of the first three
  stages (the reference's pre_layer_indx 1..3; "layer1" is `early`); features_at(name, x)
  and forward_from(name, z) (z at that point -> penultimate h).

Submodules are named like torchvision's (conv1, bn1, layer1[i].conv1, layer1[i].downsample[0],
fc, ...) and convolutions use PyTorch's symmetric padding, so a PyTorch state dict maps onto
these parameters by name (conv weight OIHW -> kernel HWIO, fc weight -> kernel.T,
BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var).
BatchNorm uses PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9; eps 1e-5) and follows
the module's train/eval mode (`model.train()` / `model.eval()`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, fan_out


def _conv(cin, cout, k, stride, rngs):
  p = k // 2
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                  use_bias=False, kernel_init=_conv_init, rngs=rngs)


def _bn(c, rngs):
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, planes, 3, stride, rngs)
    self.bn1 = _bn(planes, rngs)
    self.conv2 = _conv(planes, planes, 3, 1, rngs)
    self.bn2 = _bn(planes, rngs)
    if stride != 1 or cin != planes:
      self.downsample = nnx.List([_conv(cin, planes, 1, stride, rngs), _bn(planes, rngs)])
    else:
      self.downsample = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.downsample is not None:
      x = self.downsample[1](self.downsample[0](x))
    return nnx.relu(x + y)


class Bottleneck(nnx.Module):
  """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    cout = planes * self.expansion
    self.conv1 = _conv(cin, planes, 1, 1, rngs)
    self.bn1 = _bn(planes, rngs)
    self.conv2 = _conv(planes, planes, 3, stride, rngs)
    self.bn2 = _bn(planes, rngs)
    self.conv3 = _conv(planes, cout, 1, 1, rngs)
    self.bn3 = _bn(cout, rngs)
    if stride != 1 or cin != cout:
      self.downsample = nnx.List([_conv(cin, cout, 1, stride, rngs), _bn(cout, rngs)])
    else:
      self.downsample = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.downsample is not None:
      x = self.downsample[1](self.downsample[0](x))
    return nnx.relu(x + y)


class ResNet(nnx.Module):
  """Generic ResNet; `small_input=True` is the 32x32 stem (3x3 conv, no max-pool)."""

  def __init__(self, block, layers, num_classes: int = 10, in_channels: int = 3,
               small_input: bool = False, width: int = 64, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.in_channels = in_channels
    self.small_input = small_input
    if small_input:
      self.conv1 = _conv(in_channels, width, 3, 1, rngs)
    else:
      self.conv1 = _conv(in_channels, width, 7, 2, rngs)
    self.bn1 = _bn(width, rngs)
    cin = width
    stages = []
    for i, n in enumerate(layers):
      planes = width * 2**i
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block(cin, planes, stride, rngs=rngs))
        cin = planes * block.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.feature_dim = cin
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def early(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    if not self.small_input:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for blk in self.layer1:
      x = blk(x)
    return x

  def from_early(self, e: jax.Array) -> jax.Array:
    x = e
    for stage in (self.layer2, self.layer3, self.layer4):
      for blk in stage:
        x = blk(x)
    return jnp.mean(x, axis=(1, 2))

  SPLIT_POINTS = ("layer1", "layer2", "layer3")

  def split_points(self) -> tuple:
    return self.SPLIT_POINTS

  def _stage_index(self, name: str) -> int:
    if name not in self.SPLIT_POINTS:
      raise ValueError(f"unknown split point {name!r}; choose from {self.SPLIT_POINTS}")
    return self.SPLIT_POINTS.index(name)

  def features_at(self, name: str, x: jax.Array) -> jax.Array:
    i = self._stage_index(name)
    x = self.early(x)
    for stage in (self.layer2, self.layer3)[:i]:
      for blk in stage:
        x = blk(x)
    return x

  def forward_from(self, name: str, z: jax.Array) -> jax.Array:
    i = self._stage_index(name)
    x = z
    for stage in (self.layer2, self.layer3, self.layer4)[i:]:
      for blk in stage:
        x = blk(x)
    return jnp.mean(x, axis=(1, 2))

  def head(self, h: jax.Array) -> jax.Array:
    return self.fc(h)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.from_early(self.early(x)))


class ResNet18(ResNet):
  """CIFAR/OpenOOD ResNet-18: 3x3 stem, no max-pool, BasicBlocks [2,2,2,2], h is 512-d."""

  def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, *,
               rngs: nnx.Rngs):
    super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, small_input=True,
                     width=width, rngs=rngs)


class ResNet50(ResNet):
  """torchvision ResNet-50: 7x7/2 stem + 3x3/2 max-pool, Bottlenecks [3,4,6,3], h is 2048-d."""

  def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 64, *,
               rngs: nnx.Rngs):
    super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, small_input=False,
                     width=width, rngs=rngs)
