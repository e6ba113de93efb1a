"""Where data and caches live.

Data roots are searched in order: an explicit `data_dir`, then `$GROOD_DATA_DIR`, then the cache
(`$GROOD_CACHE_DIR`, default `~/.cache/grood_jax`). Each dataset keeps its own sub-folder.
"""

from __future__ import annotations

import os


def cache_root() -> str:
  """Cache folder of grood_jax: `$GROOD_CACHE_DIR` or `~/.cache/grood_jax`."""
  return os.environ.get("GROOD_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "grood_jax")


def data_roots(data_dir: str | os.PathLike | None = None) -> list[str]:
  """The folders searched for a dataset, most specific first (duplicates removed)."""
  roots = []
  for root in (data_dir, os.environ.get("GROOD_DATA_DIR"), cache_root()):
    if root and os.fspath(root) not in roots:
      roots.append(os.path.expanduser(os.fspath(root)))
  return roots
