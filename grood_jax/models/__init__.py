"""Flax NNX backbones with one interface: early / from_early / head / __call__.

`build_model(config.model, num_classes, in_channels)` makes one from a config;
`ModelFns` (modelfns.py) turns a model into pure, jitted functions of its parameters.
"""

from __future__ import annotations

from flax import nnx

from grood_jax.models.cnn import DenseCNN, SmallCNN
from grood_jax.models.resnet import ResNet18, ResNet50

_MODELS = {"cnn": SmallCNN, "cnn_dense": DenseCNN, "resnet18": ResNet18, "resnet50": ResNet50}


def register_model(name: str, cls) -> None:
  """Makes an NNX backbone class available by name (configs' `model.name`, checkpoints)."""
  _MODELS[name] = cls


def build_model(name: str, num_classes: int, in_channels: int = 1, seed: int = 0, **kwargs):
  """A new model of the registered architecture `name`, initialised from `seed`."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(_MODELS)}")
  return _MODELS[name](num_classes=num_classes, in_channels=in_channels,
                       rngs=nnx.Rngs(seed), **kwargs)


def model_names() -> list[str]:
  """Every registered architecture name."""
  return sorted(_MODELS)
