"""The packaged training configs (ml_collections files with `get_config(arg)`), addressable by
name: `grood-train --config fashion_mnist_6v4_cnn:smoke` is this folder's file of that name.

  config_names()               -> ['fashion_mnist_6v4_cnn', ...]
  config_path("fashion_mnist_cnn") -> the file's path inside the installed package
"""

from __future__ import annotations

import os

_DIR = os.path.dirname(os.path.abspath(__file__))


def config_names() -> list[str]:
  """Names of the packaged configs."""
  return sorted(f[:-3] for f in os.listdir(_DIR) if f.endswith(".py") and not f.startswith("_"))


def config_path(name: str) -> str | None:
  """The packaged config file called `name` (with or without `.py`, or a `configs/NAME.py`
  path of a clone), or None when there is none."""
  base = os.path.basename(name)
  base = base[:-3] if base.endswith(".py") else base
  path = os.path.join(_DIR, base + ".py")
  return path if base in config_names() else None


def resolve(spec: str) -> str:
  """`PATH[:variant]` unchanged when PATH exists; else a packaged config's path by name."""
  path, sep, variant = spec.partition(":")
  if os.path.exists(path):
    return spec
  found = config_path(path)
  return spec if found is None else found + sep + variant
