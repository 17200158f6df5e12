#!/usr/bin/env bash
# Install, then run the whole test suite (25-30 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
python3 -m pytest -q --durations=15 "$@"
