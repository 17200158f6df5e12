#!/usr/bin/env bash
# Install, then run the whole test suite. Test files run in TEST_WORKERS processes at once (default
# 2; a file's tests stay together, so its shared checkpoints are built once): most tests launch
# DeepSpeed jobs whose start-up leaves cores idle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
python3 -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
