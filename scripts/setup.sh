#!/usr/bin/env bash
# Install ds-upcycle and its dependencies into the active Python environment (make one first:
# python3 -m venv .venv && source .venv/bin/activate). Torch is installed first, pinned, only when
# missing: an unpinned torch would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
say() { echo "setup: $*"; }
if [ "$("$PYTHON" -c 'import sys; print(sys.prefix != sys.base_prefix)')" != True ]; then
  say "no virtual environment is active: installing into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  say "(a fresh one keeps this apart: python3 -m venv .venv && source .venv/bin/activate)"
fi
started=$SECONDS
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (a minute or more: it is large)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
say "installing ds-upcycle with DeepSpeed, transformers, lm-eval and the test tools (a few minutes on a fresh environment)"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
say "done in $((SECONDS - started)) s: $("$PYTHON" -m ds_upcycle.cli --version 2>/dev/null), torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
