#!/usr/bin/env bash
# Install ds-upcycle and its dependencies into the current Python environment.
# Torch is installed first, pinned, only when missing: an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
