"""Shim so that `python train.py ...` works in a clone: the command is `grood_jax.cli.train`
(installed as `grood-train`)."""

import sys

from grood_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main(sys.argv))
