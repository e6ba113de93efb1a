"""Shared defaults live in the library (`grood_jax.training.config`), because config files are
loaded by path; this module re-exports them for readers who look here first."""

from grood_jax.training.config import base_config, smoke  # noqa: F401
