#!/usr/bin/env bash
# Install, then run the whole test suite. Test files run in TEST_WORKERS processes at once (default
# 2; a file's tests stay together, so its shared checkpoints are built once): most tests launch
# DeepSpeed jobs whose start-up leaves cores idle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# One torch thread a worker: with two workers on two cores, torch's default (a thread a core) has
# its threads wait on each other. Six in-process-heavy files (evaluation, calibration, the router),
# two workers, alone: 157 and 169 s with one thread against 203 and 195 s without (2026-12-07).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
