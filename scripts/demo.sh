#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job on the embedded default. Extra arguments
# go to the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/regate-lightning" fit --config recipes/demo_regate.yaml "$@"
