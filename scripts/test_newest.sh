#!/usr/bin/env bash
# Proves grood_jax on the newest jax / flax the package index serves for Python 3.12.
#
# Creates a separate virtual environment .venv-newest (Python 3.12), installs jax + flax at the
# versions below and every other runtime + test requirement UNPINNED (the names of
# requirements.txt / requirements-test.txt with their pins stripped, so pip resolves the newest
# versions compatible with that jax / flax), installs grood_jax itself (editable), writes
# `pip freeze` to .venv-newest/pip-freeze.txt and runs the test suite.
#
# Usage: bash scripts/test_newest.sh [--fresh] [--full] [pytest args...]
#   --fresh   delete .venv-newest first (default: reuse it, re-running the installs)
#   --full    run all of tests/ (about 45 minutes on 2 cores) instead of the fast subset
#             below (the default, about 10 minutes)
# Environment:
#   PYTHON312      the Python 3.12 interpreter (default: /root/.pyenv/versions/3.12.1/bin/python,
#                  else python3.12 on PATH)
#   JAX_VERSION    default 0.12.0.1        FLAX_VERSION   default 0.12.12
#   NEWEST_TORCH   1 (default): also install torch==2.13.0 (the test extra, as pinned); when it
#                  does not install, carry on without it (the PyTorch tests skip). 0: leave it out.
#   VENV_NEWEST    default .venv-newest
set -uo pipefail
cd "$(dirname "$0")/.."

JAX_VERSION=${JAX_VERSION:-0.12.0.1}
FLAX_VERSION=${FLAX_VERSION:-0.12.12}
TORCH_VERSION=2.13.0
NEWEST_TORCH=${NEWEST_TORCH:-1}
VENV=${VENV_NEWEST:-.venv-newest}

FRESH=0
FULL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --fresh) FRESH=1; shift ;;
    --full) FULL=1; shift ;;
    *) break ;;
  esac
done

# Fast subset (default): models (test_models), features + compile counts (test_compile), GROOD
# maths (test_grood), low-dim (test_lowdim), detectors (test_detectors), exact kNN + mesh /
# sharding on 4 CPU devices (test_sharding), metrics (test_metrics), train step, checkpoint
# save/restore/resume and configs (test_training), float precision (test_precision), import
# graph / public API (test_layout), the README's Python API example (test_readme).
FAST_TESTS="tests/test_models.py tests/test_compile.py tests/test_grood.py tests/test_lowdim.py
 tests/test_detectors.py tests/test_sharding.py tests/test_metrics.py tests/test_training.py
 tests/test_precision.py tests/test_layout.py tests/test_readme.py"

log() { echo "[test_newest] $*"; }
die() { echo "[test_newest] error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- the Python 3.12 interpreter
PY=""
for cand in "${PYTHON312:-}" /root/.pyenv/versions/3.12.1/bin/python python3.12; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
[ -n "$PY" ] || die "no Python 3.12 found: set PYTHON312=/path/to/python3.12 (tried \$PYTHON312,
 /root/.pyenv/versions/3.12.1/bin/python, python3.12 on PATH)"
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
  || die "$PY does not run"
[ "$pyver" = "3.12" ] || die "$PY is Python $pyver, not 3.12: set PYTHON312 to a Python 3.12"

# ---------------------------------------------------------------- the virtual environment
if [ "$FRESH" = 1 ] && [ -d "$VENV" ]; then
  log "removing $VENV"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV" || die "could not create $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip || die "could not upgrade pip"
fi
VPY="$VENV/bin/python"

# Requirement names with the pins (==, >=, ~=, <, ...), extras markers and comments stripped;
# jax / jaxlib / flax are given explicitly, torch separately, flit_core with pyproject's range.
names=$(cat requirements.txt requirements-test.txt \
  | sed -e 's/#.*//' -e 's/[[:space:]]//g' \
  | grep -v -e '^$' -e '^-' \
  | sed -e 's/[;<>=!~].*//' \
  | grep -v -i -x -e jax -e jaxlib -e flax -e torch -e flit_core -e flit-core \
  | sort -u | tr '\n' ' ')
log "pip install jax==$JAX_VERSION flax==$FLAX_VERSION jaxlib flit_core<5 $names"
"$VPY" -m pip install -q --upgrade "jax==$JAX_VERSION" "flax==$FLAX_VERSION" jaxlib \
  "flit_core>=3.9,<5" $names || die "pip install of the requirements failed"

if [ "$NEWEST_TORCH" = 1 ]; then
  log "pip install torch==$TORCH_VERSION (test extra; the PyTorch tests skip without it)"
  "$VPY" -m pip install -q "torch==$TORCH_VERSION" \
    || log "torch==$TORCH_VERSION does not install on Python 3.12: carrying on without it"
else
  log "torch left out (NEWEST_TORCH=0): the PyTorch tests skip"
fi

log "pip install -e . (grood_jax itself)"
"$VPY" -m pip install -q --no-deps --no-build-isolation -e . \
  || "$VPY" -m pip install -q --no-deps . || die "could not install grood_jax"
"$VPY" -m pip check || log "pip check reports conflicts (above)"

"$VPY" -m pip freeze > "$VENV/pip-freeze.txt"
log "pip freeze written to $VENV/pip-freeze.txt"
"$VPY" - <<'EOF'
import importlib.metadata as md, sys
names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "grain",
         "tensorflow-datasets", "torch"]
vers = []
for n in names:
  try:
    vers.append(f"{n} {md.version(n)}")
  except md.PackageNotFoundError:
    vers.append(f"{n} (absent)")
print("[test_newest] python %d.%d.%d; " % sys.version_info[:3] + ", ".join(vers))
EOF

# ---------------------------------------------------------------- the tests
if [ "$FULL" = 0 ]; then
  log "pytest (fast subset): $FAST_TESTS"
  # shellcheck disable=SC2086
  "$VPY" -m pytest -p no:cacheprovider $FAST_TESTS "$@"
else
  log "pytest tests/"
  "$VPY" -m pytest -p no:cacheprovider tests "$@"
fi
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
