#!/usr/bin/env bash
# The operator swap (docs/RESULTS.md): the upcycled arm at 50% CPT under each config given (a config
# of the same regime, e.g. `base: stream`), every one from the same stable-phase source as the
# upcycled run in BASE.
#
#   bash scripts/operator_swap.sh BASE SEEDS CONFIG... [-- REGIME_LEAD_ARGS...]
#   e.g. bash scripts/operator_swap.sh runs/stream 0,1,2,3 configs/swap-authors.yaml configs/swap-rank.yaml
#
# Arguments after `--` go to every regime_lead.py call (--data for a config that names none).
#
# BASE is `python scripts/regime_lead.py --config stream --seeds SEEDS --out BASE --upcycled`'s
# output (Fixed-E, Fixed-mE and the plain arm), or the same for another regime's config. Each CONFIG
# runs in BASE-<config file name>, its Fixed-E, Fixed-mE and source linked to BASE's, then its final
# checkpoints are evaluated on 1,024 validation sequences, or all where there are fewer
# (regime_lead --final-samples 1024), beside BASE's.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(realpath "$1"); seeds=$2; shift 2
configs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do configs+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the `--`
for config in "${configs[@]}"; do
  out="$base-$(basename "$config" .yaml)"
  for seed in ${seeds//,/ }; do
    mkdir -p "$out/seed-$seed"
    for arm in fixed-e fixed-me source-cpt50; do
      [ -e "$out/seed-$seed/$arm" ] || ln -s "$base/seed-$seed/$arm" "$out/seed-$seed/$arm"
    done
  done
  python scripts/regime_lead.py --config "$config" --seeds "$seeds" --out "$out" --upcycled --final-samples 1024 "$@"
done
