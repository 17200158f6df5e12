#!/usr/bin/env bash
# The main job on the built-in data: train a tiny 4-expert MoE with expert parallelism on two
# processes and print its validation loss. Runs on CPU (a few minutes) or GPU unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/quickstart}
CONFIG=ds_configs/zero2_fp32.json
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && CONFIG=ds_configs/zero2_bf16.json
deepspeed --num_gpus 2 train.py --deepspeed_config "$CONFIG" --model tiny --ep-size 2 \
  --micro-batch-size 8 --steps "${STEPS:-300}" --eval-interval 100 --save "$RUN"
echo "checkpoint: $RUN/$(cat "$RUN/latest"), metrics: $RUN/metrics.jsonl"
