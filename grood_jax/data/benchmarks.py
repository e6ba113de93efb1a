"""Named benchmarks: an ID dataset (train / val / test) with near and far OOD sets.

A registry maps each name to a builder `fn(*, data_dir, seed, val_fraction) -> Benchmark`
(builders that take loading options also accept `options=`, e.g. the OpenOOD ones take an
`openood.Options`); other modules add theirs with `register_benchmark`. The OpenOOD v1.5
benchmarks are listed here by name as "module:function" and their module is imported on first
use, so this module imports no loader it does not need (and none imports it back in a cycle).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import numpy as np

from grood_jax.data import fashion_mnist, generated
from grood_jax.data.base import Benchmark, DataError, ImageSet, OODSet

BenchmarkFn = Callable[..., Benchmark]
_REGISTRY: dict[str, BenchmarkFn] = {}
# name -> "module:function", imported on first use
LAZY: dict[str, str] = {
    "cifar10": "grood_jax.data.openood:cifar10",
    "cifar100": "grood_jax.data.openood:cifar100",
    "imagenet200": "grood_jax.data.openood:imagenet200",
    "imagenet1k": "grood_jax.data.openood:imagenet1k",
}


def register_benchmark(name: str, fn: BenchmarkFn, *, overwrite: bool = False) -> None:
  """Make `load_benchmark(name)` call `fn(data_dir=..., seed=..., val_fraction=...)`."""
  if (name in _REGISTRY or name in LAZY) and not overwrite:
    raise DataError(f"benchmark {name!r} is already registered; pass overwrite=True to replace")
  LAZY.pop(name, None)
  _REGISTRY[name] = fn


def benchmark_names() -> list[str]:
  return sorted(set(_REGISTRY) | set(LAZY))


def benchmark_builder(name: str) -> BenchmarkFn:
  """The builder of benchmark `name`, importing its module on first use."""
  if name not in _REGISTRY and name in LAZY:
    module, _, attr = LAZY[name].partition(":")
    _REGISTRY[name] = getattr(importlib.import_module(module), attr)
  if name not in _REGISTRY:
    raise DataError(f"unknown benchmark {name!r}; choose from {benchmark_names()}")
  return _REGISTRY[name]


def _takes_options(fn) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == "options" or p.kind is p.VAR_KEYWORD for p in params)


def load_benchmark(name: str, *, data_dir=None, seed: int = 0, val_fraction: float = 1 / 12,
                   options=None) -> Benchmark:
  """Build the named benchmark. `seed` fixes the ID validation split and the generated sets.

  `options`: loading options for builders that take them (for the OpenOOD benchmarks an
  `openood.Options`: source, data_root, max_per_set, allow_missing, ...); builders that take
  none ignore them.
  """
  fn = benchmark_builder(name)
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
  kwargs = dict(data_dir=data_dir, seed=seed, val_fraction=val_fraction)
  if options is not None and _takes_options(fn):
    kwargs["options"] = options
  return fn(**kwargs)


def split_train_val(data: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
  """Stratified split: round(val_fraction · n_c) images of each class c go to validation."""
  if data.labels is None:
    raise DataError(f"{data.name}: a train/val split needs labels")
  rng = np.random.default_rng([seed, 0x5e1])
  val_idx = []
  for c in np.unique(data.labels):
    idx_c = np.flatnonzero(data.labels == c)
    n_val = int(round(val_fraction * len(idx_c)))
    val_idx.append(rng.permutation(idx_c)[:n_val])
  val_mask = np.zeros(len(data), bool)
  val_mask[np.concatenate(val_idx)] = True
  if val_mask.all() or not val_mask.any():
    raise DataError(f"{data.name}: val_fraction={val_fraction} leaves an empty train or val split")
  return (data.subset(np.flatnonzero(~val_mask), data.name + "_train"),
          data.subset(np.flatnonzero(val_mask), data.name + "_val"))


def _fmnist_ood(name: str, group: str, seed: int, data_dir) -> OODSet:
  data = generated.make(name, seed=seed, data_dir=data_dir)
  return OODSet(name, group, data)


def _fashion_mnist(*, data_dir=None, seed=0, val_fraction=1 / 12) -> Benchmark:
  train, test = fashion_mnist.load_fashion_mnist(data_dir)
  id_train, id_val = split_train_val(train, val_fraction, seed)
  return Benchmark(
      name="fashion_mnist", num_classes=10, class_names=list(fashion_mnist.CLASS_NAMES),
      image_shape=(28, 28, 1), mean=fashion_mnist.MEAN, std=fashion_mnist.STD,
      id_train=id_train, id_val=id_val, id_test=test.subset(slice(None), "fashion_mnist_test"),
      ood=[_fmnist_ood("letters", "near", seed, data_dir),
           _fmnist_ood("mnist", "far", seed, data_dir),
           _fmnist_ood("textures", "far", seed, data_dir)],
      ood_val=generated.letters_val(seed=seed),
      noise=generated.noise(seed=seed))


def _fashion_mnist_6v4(*, data_dir=None, seed=0, val_fraction=1 / 12) -> Benchmark:
  train, test = fashion_mnist.load_fashion_mnist(data_dir)
  num_id = 6
  train_id = train.subset(np.flatnonzero(train.labels < num_id), "fashion_mnist_6v4")
  id_train, id_val = split_train_val(train_id, val_fraction, seed)
  id_test = test.subset(np.flatnonzero(test.labels < num_id), "fashion_mnist_6v4_test")
  near = ImageSet("fmnist_6to9", test.images[test.labels >= num_id])
  return Benchmark(
      name="fashion_mnist_6v4", num_classes=num_id,
      class_names=list(fashion_mnist.CLASS_NAMES[:num_id]),
      image_shape=(28, 28, 1), mean=fashion_mnist.MEAN, std=fashion_mnist.STD,
      id_train=id_train, id_val=id_val, id_test=id_test,
      ood=[OODSet("fmnist_6to9", "near", near),
           _fmnist_ood("letters", "far", seed, data_dir),
           _fmnist_ood("mnist", "far", seed, data_dir),
           _fmnist_ood("textures", "far", seed, data_dir)],
      ood_val=generated.letters_val(seed=seed),
      noise=generated.noise(seed=seed))


register_benchmark("fashion_mnist", _fashion_mnist)
register_benchmark("fashion_mnist_6v4", _fashion_mnist_6v4)
