#!/usr/bin/env bash
# README command 2: installs what the tests need and runs the whole test suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test || exit 1
# two workers, each test file whole on one worker (module fixtures built once); -n 0 for serial
.venv/bin/python -m pytest tests -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
