#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install regate-lightning with its test extras.
#   VENV=path   where the environment lives (default: .venv in the repository root)
#   PYTHON=exe  the interpreter to build it with (default: python3.11, else python3)
#   EXTRAS=list the package extras to install (default: test)
# On a machine without an NVIDIA GPU, torch==2.13.0 (CPU build) is installed before anything else,
# so that no dependency pulls a multi-GB CUDA build. Where torch is already importable (a GPU cluster's
# own CUDA build, say), it is kept as it is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
"${pip[@]}" -c "$root/constraints.txt" -e "$root[${EXTRAS:-test}]" "$@"
echo "regate-lightning installed in $venv"
