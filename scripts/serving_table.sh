#!/usr/bin/env bash
# The serving table of docs/SERVING.md: every family's export served by vLLM against transformers.
#   VLLM_PYTHON=<vLLM's environment>/bin/python bash scripts/serving_table.sh runs/serving
# Step 1 runs in ds-upcycle's environment (the active python), step 2 in vLLM's own.
set -euo pipefail
out=${1:?usage: serving_table.sh OUT_DIR}
vllm_python=${VLLM_PYTHON:?set VLLM_PYTHON to the python of the environment vLLM is installed in}
here=$(cd "$(dirname "$0")" && pwd)
python "$here/serving_exports.py" "$out"
exports=()
for family in mixtral qwen3_moe olmoe ernie4_5_moe ernie4_5_moe-zero-bias glm4_moe; do exports+=("$out/$family/export"); done
# vLLM is run from outside the repository so that its imports cannot pick up files here.
(cd "$out" && "$vllm_python" "$here/serve_check.py" "${exports[@]}" --markdown --json "$out/serving.json")
