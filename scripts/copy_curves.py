"""The copy diagnostics recorded during training, over seeds: one curve per group of runs.

    python scripts/copy_curves.py --plot docs/stream_copies.png \
        "plain=runs/variants/plain/seed-*/upcycled-cpt50-grad_sq" "random=runs/variants/random/seed-*/upcycled-*"

Each LABEL=GLOB names the save directories of one arm over seeds (a staged arm: LABEL=GLOB1+GLOB2
joins its stages' metrics.jsonl in order). Prints, per label and evaluation step, the mean ± std
over seeds of the sibling and cross distances and the co-selection share (each a mean over MoE
layers, as train.py records them), and with --plot draws them.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
from pathlib import Path

from ds_upcycle.checkpoint import read_metrics
from ds_upcycle.reproduce.plots import copy_curves

KEYS = ("sibling_distance", "cross_distance", "co_selected")


def seed_curves(pattern: str) -> list[dict]:
    """One copy_curves dict per seed; a pattern 'A+B' joins the runs A and B of each seed in order."""
    parts = [sorted(glob.glob(p)) for p in pattern.split("+")]
    if not parts[0] or len({len(p) for p in parts}) > 1:
        raise SystemExit(f"copy_curves: {pattern}: no runs, or parts with different numbers of runs")
    return [copy_curves([r for run in runs for r in read_metrics(Path(run) / "metrics.jsonl")])
            for runs in zip(*parts)]


def over_seeds(curves: list[dict]) -> dict[int, dict[str, tuple[float, float]]]:
    steps = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    out = {}
    for step in steps:
        values = {k: [c[k][c["step"].index(step)] for c in curves] for k in KEYS}
        out[step] = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in values.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", metavar="LABEL=GLOB")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if any("=" not in g for g in args.groups):
        sys.exit("copy_curves: give every group as LABEL=GLOB")
    table = {label: over_seeds(seed_curves(pattern)) for label, pattern in (g.split("=", 1) for g in args.groups)}
    print("| run | step | sibling distance | cross distance | co-selected |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, rows in table.items():
        for step, f in rows.items():
            print(f"| {label} | {step:,} | " + " | ".join(f"{f[k][0]:.3f} ± {f[k][1]:.3f}" for k in KEYS) + " |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for n, (label, rows) in enumerate(table.items()):
            color, steps = plt.get_cmap("tab10")(n), list(rows)
            left.errorbar(steps, [rows[s]["sibling_distance"][0] for s in steps],
                          yerr=[rows[s]["sibling_distance"][1] for s in steps], color=color, marker=".", label=label)
            right.errorbar(steps, [rows[s]["co_selected"][0] for s in steps],
                           yerr=[rows[s]["co_selected"][1] for s in steps], color=color, marker=".", label=label)
        left.axhline(2 ** 0.5, color="black", linewidth=0.8, alpha=0.5)
        left.set_ylabel("sibling distance (black: independent experts)")
        right.set_ylabel("share of tokens taking two copies of one expert")
        for ax in (left, right):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("copies over CPT, mean ± std over seeds", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
