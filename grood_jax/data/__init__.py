"""Data: sources (Fashion-MNIST, npz, image folders, generated OOD sets), named benchmarks and
the grain training pipeline."""

from grood_jax.data.auxiliary import load_auxiliary
from grood_jax.data.base import Benchmark, DataError, ImageSet, OODSet, normalize
from grood_jax.data.benchmarks import benchmark_names, load_benchmark, register_benchmark
from grood_jax.data.fashion_mnist import load_fashion_mnist
from grood_jax.data.pipeline import TrainLoader, steps_per_epoch
from grood_jax.data.sources import load_source, parse_ood_spec

__all__ = [
    "Benchmark", "DataError", "ImageSet", "OODSet", "normalize", "benchmark_names",
    "load_benchmark", "register_benchmark", "load_fashion_mnist", "TrainLoader",
    "steps_per_epoch", "load_source", "parse_ood_spec", "load_auxiliary",
]
