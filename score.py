"""Shim so that `python score.py ...` works in a clone: the command is `grood_jax.cli.score`
(installed as `grood-score`)."""

import sys

from grood_jax.cli.score import main

if __name__ == "__main__":
  sys.exit(main())
