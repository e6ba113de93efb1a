"""The command lines: `grood-train`, `grood-score`, `grood-convert` (also `python -m
grood_jax.cli.train|score|convert`, and the top-level train.py / score.py shims of a clone).

They share one error-handling path (`common.run_cli`): bad input is one line `error: ...` and
exit status 2, a non-finite score one line and status 1, anything unexpected a traceback and
status 1, Ctrl-C status 130.
"""
