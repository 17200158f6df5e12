"""Upcycled arms side by side, paired per seed: gap closed on the final checkpoints and the
difference from a reference arm, seed by seed.

    python scripts/paired_arms.py --base runs/stream --seeds 0,1,2,3 --samples 1024 \\
        plain=runs/stream authors=runs/stream-swap-authors rank=runs/stream-swap-rank

Each LABEL=DIR[:ARM] names a run directory laid out as `regime_lead.py` / `reproduce` leave it
(DIR/seed-<s>/<arm>); the arm is ARM, or --arm (default the 50% CPT grad_sq arm), e.g.
uniform=runs/stream-table4-uniform:upcycled-cpt50-uniform. Fixed-E and Fixed-mE come
from --base. Every checkpoint is evaluated on the first --samples validation sequences (one CPU
process, fp32, as reproduce's final evaluation). Printed: per arm the warm-start jump, the gap
closed (L_E - L_up) / (L_E - L_mE) per seed and mean ± sample std, and against the first arm the
paired difference in points per seed, mean ± std, and how many seeds are ahead by 20 points or more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ds_upcycle.checkpoint import find_checkpoint
from ds_upcycle.errors import UserError
from ds_upcycle.trained import RunData, checkpoint_loss

MARKER = "COMPLETE.json"


def final_loss(arm_dir: Path, samples: int, cache: dict) -> float:
    key = str(arm_dir.resolve())
    if key not in cache:
        ref = find_checkpoint(arm_dir)
        data = RunData(ref).split("val")
        cache[key] = checkpoint_loss(ref.path, data, min(samples, data.num_samples))
    return cache[key]


def jump(expanded_dir: Path) -> float | None:
    marker = expanded_dir / MARKER
    if not marker.is_file():
        return None
    return (json.loads(marker.read_text()).get("warm_start") or {}).get("jump")


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="run directory holding seed-<s>/fixed-e and fixed-me")
    parser.add_argument("--seeds", required=True)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--arm", default="upcycled-cpt50-grad_sq")
    parser.add_argument("arms", nargs="+", metavar="LABEL=DIR[:ARM]")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cache: dict = {}
    try:
        fixed = {s: [final_loss(Path(args.base) / f"seed-{s}" / name, args.samples, cache)
                     for name in ("fixed-e", "fixed-me")] for s in seeds}
        closed: dict[str, list[float]] = {}
        print(f"| arm | warm-start jump (mean) | gap closed, {args.samples} sequences, % | per seed |")
        print("| --- | ---: | ---: | --- |")
        for item in args.arms:
            label, _, where = item.partition("=")
            path, _, arm = where.partition(":")
            arm = arm or args.arm
            rows, jumps = [], []
            for s in seeds:
                seed_dir = Path(path) / f"seed-{s}"
                e, m = fixed[s]
                up = final_loss(seed_dir / arm, args.samples, cache)
                rows.append(100 * (e - up) / (e - m))
                j = jump(seed_dir / arm.replace("upcycled-", "expanded-", 1))
                if j is not None:
                    jumps.append(j)
            closed[label] = rows
            shown_jump = f"{statistics.mean(jumps):+.3f}" if jumps else "-"
            print(f"| {label} | {shown_jump} | {mean_std(rows)} | {', '.join(f'{r:.1f}' for r in rows)} |")
        reference, *others = closed
        print()
        print(f"| arm | paired vs {reference}, points | per seed | seeds >= +20 | seeds within ±10 |")
        print("| --- | ---: | --- | ---: | ---: |")
        for label in others:
            diffs = [a - b for a, b in zip(closed[label], closed[reference])]
            print(f"| {label} | {mean_std(diffs)} | {', '.join(f'{d:+.1f}' for d in diffs)} | "
                  f"{sum(d >= 20 for d in diffs)} of {len(diffs)} | {sum(abs(d) <= 10 for d in diffs)} of {len(diffs)} |")
        print()
        print("Fixed-E / Fixed-mE per seed: " + ", ".join(f"{s}: {e:.4f} / {m:.4f}" for s, (e, m) in fixed.items()))
    except UserError as err:
        sys.exit(f"paired_arms: {err}")


if __name__ == "__main__":
    main()
