#!/usr/bin/env bash
# Installs everything grood_jax needs on a fresh Debian machine: the Debian packages (the
# Fashion-MNIST data set and the fonts the `letters` OOD sets are rendered from), a virtual
# environment in .venv, the pinned Python requirements, and grood_jax itself (editable).
# Usage: bash scripts/setup.sh [--test]     (--test adds the test requirements)
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES="dataset-fashion-mnist fontconfig fonts-dejavu-core fonts-dejavu-extra fonts-liberation
 fonts-liberation2 fonts-freefont-ttf fonts-urw-base35 fonts-noto-core fonts-crosextra-carlito
 fonts-crosextra-caladea fonts-texgyre fonts-lato fonts-open-sans fonts-roboto"
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
req=requirements.txt
[ "${1:-}" = "--test" ] && req=requirements-test.txt
echo "[setup] pip install -r $req"
.venv/bin/pip install -q -r "$req"
.venv/bin/pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || .venv/bin/pip install -q --no-deps -e .
echo "[setup] done: $(.venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.devices())')"
