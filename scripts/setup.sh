#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv and install ppgseg with its test tools.
# Reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.ppgseg-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # sam2 ships as source: build it without its optional CUDA extension (not needed for image mode or tests).
  SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
