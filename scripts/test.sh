#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${VENV:-$root/.venv}"
cd "$root"
"$venv/bin/ruff" check regate_lightning tests benchmarks
set +e
"$venv/bin/python" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no test: treating as a failure" >&2
  exit 1
fi
exit "$status"
