#!/usr/bin/env bash
# The GPU check: one prepared run on a GPU machine without network access. It installs the carried
# wheels, then runs each check under its own time limit (one failure does not eat the others'
# time) and leaves in $OUT: gpu_check.log (every step's output), figures.json (every figure, the
# GPU and the versions), and the reproduction's summary.md, compare.md, loss.png and routing.png.
#
#   OUT=/tmp/gpu-check bash scripts/gpu_check.sh             # on the GPU machine
#   OUT=/tmp/gpu-check bash scripts/gpu_check.sh --dry-run   # on CPU: every step at toy sizes
#   CHECKS=train,eval bash scripts/gpu_check.sh               # some steps only (a rerun)
#   CHECKS=score bash scripts/gpu_check.sh                    # the scoring pass alone (issue 20)
#
# On an H200 the steps took 84, 40, 57, about 60 and 154 s (docs/BENCHMARKS.md, "GPU"), before
# the train steps also timed a second dispatch (two more engines each, limits 110 and 130 s); that
# second dispatch is now DeepSpeed AutoEP's layer (moe_dispatch=autoep). The limits add up to 640 s, over one 10-minute command: run
# CHECKS=quickstart,train,eval first, then CHECKS=reproduce,score on the still-warm machine
# (reproduce reads the quick start's step time from WORK). The scoring pass (step score, limit
# 150 s) and the AutoEP engines have not run on a GPU yet.
#
# Wheels: .whl/ holds deepspeed, lm-eval and what they need beyond the machine's own packages
# (docs/BENCHMARKS.md, "GPU", lists them and how they were fetched). Without .whl/ the packages of
# the current environment are used (as with WHEELS=0).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-runs/gpu-check}
WORK=${WORK:-runs/gpu-check-work}
CHECKS=${CHECKS:-quickstart,train,eval,reproduce}  # and score
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 DS_UPCYCLE_CACHE="$WORK/cache"
[ "$DRY" = 1 ] && export DS_ACCELERATOR=cpu

if [ "${WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME LIMIT_S COMMAND...: run under a time limit, log it, record its exit code and duration.
step() {
  local name=$1 limit=$2 started rc
  shift 2
  case ",$CHECKS," in *",${name%%-*},"*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  started=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - started ))}" >>"$WORK/steps.jsonl"
  echo "== $name: exit $rc after $(( $(date +%s) - started )) s" | tee -a "$LOG"
}

python3 scripts/gpu_check.py env >"$WORK/env.json" 2>>"$LOG"

if [ "$DRY" = 1 ]; then
  step quickstart 300 env SETUP=0 STEPS=20 RUN="$WORK/quickstart" bash scripts/quickstart.sh
  step train-il8 300 python3 scripts/bench_train_throughput.py --preset tiny --batch 4 --seq-len 64 \
    --warmup 1 --repeats 2 --profile --json "$WORK/train_il8.json"
  step train-full 300 python3 scripts/bench_train_throughput.py --preset tiny --set num_experts=16 \
    --set top_k=8 --batch 4 --seq-len 64 --warmup 1 --repeats 2 --json "$WORK/train_full.json"
  step eval 300 python3 scripts/bench_eval_throughput.py --checkpoint "$WORK/quickstart" --batch-sizes 1,4 \
    --requests 8 --max-gen-toks 16 --repeats 1 --json "$WORK/eval.json"
  step score 300 python3 scripts/bench_scoring.py --size 0.1 --context 256 --cpu-reference \
    --workdir "$WORK/score" --json "$WORK/score.json"
  REPRO_SECONDS=20 REPRO_DEVICE=cpu REPRO_DTYPE=float32 REPRO_DS=zero2_fp32.json
else
  # DeepSpeed 0.19.8's JIT builder (FusedAdam) cannot parse arch suffixes such as 9.0a in the
  # machine's TORCH_CUDA_ARCH_LIST: give it the plain compute capability.
  export TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  step quickstart 120 env SETUP=0 RUN="$WORK/quickstart" bash scripts/quickstart.sh
  # The paper's interleaved shape (dim 1024, expert FFN 1536, 32 experts, top-2), 16k tokens a call.
  step train-il8 110 python3 scripts/bench_train_throughput.py --preset paper-il8 --batch 32 --seq-len 512 \
    --bf16 --warmup 3 --repeats 10 --profile --json "$WORK/train_il8.json"
  # Full-MoE style (256 experts, top-8) at dim 512, two layers so that 512 experts fit beside Adam.
  step train-full 130 python3 scripts/bench_train_throughput.py --preset paper-full --set n_layers=2 \
    --batch 16 --seq-len 512 --bf16 --warmup 3 --repeats 10 --json "$WORK/train_full.json"
  step eval 90 python3 scripts/bench_eval_throughput.py --checkpoint "$WORK/quickstart" --device cuda \
    --dtype bfloat16 --batch-sizes 32,1 --requests 32 --repeats 1 --json "$WORK/eval.json"
  # train.py --score-experts on a random 1 GB OLMoE release (bf16, one GPU), 8 batches of 8 x 1024 tokens.
  step score 150 python3 scripts/bench_scoring.py --size 1 --context 1024 --gpus 1 --bf16 --micro-batch 8 \
    --batches 8 --workdir "$WORK/score" --json "$WORK/score.json"
  REPRO_SECONDS=${REPRO_SECONDS:-30} REPRO_DEVICE=cuda REPRO_DTYPE=bfloat16 REPRO_DS=zero2_bf16.json
fi

# A reproduction sized from the quick start's measured step time: about REPRO_SECONDS of training
# steps over all arms (Fixed-E, Fixed-mE, source + CPT, control: 3.5 T steps), plus start-ups;
# REPRO_STEPS=T sets T directly (a rerun without the quick start).
case ",$CHECKS," in *",reproduce,"*)
  python3 scripts/gpu_check.py repro-config "$WORK/quickstart/metrics.jsonl" "$REPRO_SECONDS" "$REPRO_DS" \
    "$REPRO_DEVICE" "$REPRO_DTYPE" ${REPRO_STEPS:-} >"$WORK/repro.json" 2>>"$LOG" ;;
esac
step reproduce "${REPRO_LIMIT:-$([ "$DRY" = 1 ] && echo 600 || echo 200)}" python3 -m ds_upcycle.cli reproduce \
  --config "$WORK/repro.json" --out "$WORK/repro"
for f in summary.md compare.md loss.png routing.png; do
  [ -f "$WORK/repro/results/$f" ] && cp "$WORK/repro/results/$f" "$OUT/$f"
done

python3 scripts/gpu_check.py collect "$WORK" >"$OUT/figures.json" 2>>"$LOG"
echo "figures: $OUT/figures.json"
