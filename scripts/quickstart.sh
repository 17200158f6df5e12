#!/usr/bin/env bash
# The main job on the built-in data: train a tiny 4-expert MoE with expert parallelism on two
# processes (one per GPU when there are GPUs, at most two) and print its validation loss.
# Runs on CPU (a few minutes) or GPU unchanged; the global batch is 16 sequences either way.
# SETUP=0 skips the install (an environment prepared already, e.g. without network access).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SETUP:-1}" = 0 ] || bash scripts/setup.sh
RUN=${RUN:-runs/quickstart}
CONFIG=ds_configs/zero2_fp32.json
NPROC=2
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  CONFIG=ds_configs/zero2_bf16.json
  NPROC=$(python3 -c "import torch; print(min(2, torch.cuda.device_count()))")
else
  export DS_ACCELERATOR=cpu  # DeepSpeed would choose it too, with a warning from every process
fi
deepspeed --log_level warning --num_gpus "$NPROC" train.py --deepspeed_config "$CONFIG" --model tiny --ep-size "$NPROC" \
  --micro-batch-size $((16 / NPROC)) --steps "${STEPS:-300}" --eval-interval 100 --save "$RUN"
echo "checkpoint: $RUN/$(cat "$RUN/latest"), metrics: $RUN/metrics.jsonl"
