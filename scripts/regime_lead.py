"""How a reproduce config's bigger model builds its lead: Fixed-E and Fixed-mE alone, over seeds.

    python scripts/regime_lead.py --config stream --seeds 0,1,2,3 --out runs/stream-lead [--upcycled] [--staged] [--control]

Runs the two fixed-size arms of `ds-upcycle reproduce` (the same train.py commands, from its own
plan, in the same directories: OUT/seed-<s>/fixed-e, ...) for every seed, two runs at a time,
skipping arms that finished, then prints a markdown table of the validation loss at every
evaluation: both arms (mean ± sample std over seeds), the paired lead Fixed-E - Fixed-mE per seed
(mean ± std, and mean / std: how many paired standard deviations it is from zero), and the share
of the final mean lead already held at that step. This measures the regime before any method is
applied to it. With --upcycled it also runs the config's main upcycled arm (its cpt_fraction and
select: source, expansion, CPT) and prints its warm-start jump and the gap it closes at T, per seed
(paired: (L_E - L_up) / (L_E - L_mE) of the same seed), from the evaluation during training at T
and again from reproduce's final evaluation of the three checkpoints (the first final_val_samples
validation sequences), which reproduce's own tables report.
With --staged, the same for the config's staged-growth arm (`growth`), with the jump of each growth;
with --control, for the control (the main arm's source continued over the same CPT without expansion).
Each seed's directory gets copies.png: the copy diagnostics of the arms run there (plots.plot_copies).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ds_upcycle.checkpoint import find_checkpoint, read_metrics
from ds_upcycle.errors import UserError
from ds_upcycle.reproduce.config import load_config, require_data
from ds_upcycle.reproduce.experiment import Experiment
from ds_upcycle.reproduce.plan import FIXED_E, FIXED_ME, BranchStage, ExpandStage, make_plan
from ds_upcycle.reproduce.plots import plot_copies
from ds_upcycle.trained import RunData, checkpoint_loss
from ds_upcycle.reproduce.stages import (MARKER, is_complete, mark_complete, run_branch_stage, run_expand_stage,
                                         run_train_stage)


def jobs_of(exp: Experiment, upcycled: bool, staged: bool, control: bool = False) -> list[list]:
    """Chains of stages to run in order: Fixed-mE alone; Fixed-E, then (--upcycled) the main arm,
    (--control) its source continued without expansion and (--staged) the staged-growth arm."""
    plan = make_plan(exp.cfg)
    if staged and plan.staged is None:
        raise UserError(f"--staged: config {exp.cfg.name} has no growth schedule")
    if control and plan.control is None:
        raise UserError(f"--control: config {exp.cfg.name} sets control: false")
    by_name = {stage.name: stage for stage in plan.stages}
    names = [plan.main.source, plan.main.expanded, plan.main.cpt] if upcycled else []
    names += [plan.main.source, plan.control] if control else []
    if staged:
        names += [plan.staged.source, *(n for pair in zip(plan.staged.expanded, plan.staged.trained) for n in pair)]
    return [[by_name[FIXED_ME]], [by_name[FIXED_E], *(by_name[n] for n in dict.fromkeys(names))]]


def run_chain(exp: Experiment, chain: list) -> None:
    for stage in chain:
        if is_complete(exp.out / stage.name):
            continue
        exp.say(f"[seed {exp.cfg.seed}] {stage.name}")
        if isinstance(stage, BranchStage):
            record = run_branch_stage(exp, stage)
        elif isinstance(stage, ExpandStage):
            record = run_expand_stage(exp, stage)
        else:
            record = run_train_stage(exp, stage)
        mark_complete(exp.out / stage.name, record)


def val_curve(arm_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(arm_dir / "metrics.jsonl") if "val_loss" in r}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def lead_table(curves: dict[int, tuple[dict[int, float], dict[int, float]]], experts: tuple[int, int]) -> str:
    steps = sorted(set.intersection(*(set(e) & set(m) for e, m in curves.values())))
    final = statistics.mean(e[steps[-1]] - m[steps[-1]] for e, m in curves.values())
    small, big = experts
    lines = [f"| step | Fixed-{small} | Fixed-{big} | lead (paired, per seed) | lead / std | share of final lead |",
             "| ---: | --- | --- | --- | ---: | ---: |"]
    for step in steps:
        e = [curves[s][0][step] for s in curves]
        m = [curves[s][1][step] for s in curves]
        lead = [a - b for a, b in zip(e, m)]
        (lm, ls), (em, es), (mm, ms) = mean_std(lead), mean_std(e), mean_std(m)
        ratio = f"{lm / ls:.1f}" if ls > 0 else "-"
        per_seed = ", ".join(f"{x:+.4f}" for x in lead)
        lines.append(f"| {step:,} | {em:.4f} ± {es:.4f} | {mm:.4f} ± {ms:.4f} | {lm:+.4f} ± {ls:.4f} ({per_seed}) "
                     f"| {ratio} | {lm / final:.0%} |")
    return "\n".join(lines)


@functools.cache
def _final_loss(checkpoint: Path, samples: int, data_cache: str | None) -> float:
    ref = find_checkpoint(checkpoint)
    data = RunData(ref, data_cache).split("val")
    return checkpoint_loss(ref.path, data, min(samples, data.num_samples))


def final_loss(exp: Experiment, arm: str, samples: int) -> float:
    """reproduce's final evaluation of an arm's last checkpoint (evaluate.py, validation loss only)."""
    return _final_loss((exp.out / arm).resolve(), samples, exp.data_cache)


def upcycled_table(exps: list[Experiment], label: str, arm: str, expansions: tuple[str, ...], samples: int) -> str:
    """Per seed: the fixed arms and `arm` at T, the warm-start jump of each of its expansions, the gap closed."""
    lines = [f"| seed | Fixed-E at T | Fixed-mE at T | {label} at T | warm-start jump | gap closed "
             f"| final eval ({samples} seq): Fixed-E | Fixed-mE | {label} | gap closed |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    closed, closed_final = [], []
    for exp in exps:
        final = {name: val_curve(exp.out / name) for name in (FIXED_E, FIXED_ME, arm)}
        step = exp.cfg.total_steps
        if any(step not in final[name] for name in (FIXED_E, FIXED_ME)) or not final[arm]:
            raise UserError(f"{exp.out}: an arm has no evaluation at its end")
        # The arm's last evaluation: at T, or later in steps where CPT takes smaller steps (cpt_batch_split).
        e, m, up = final[FIXED_E][step], final[FIXED_ME][step], final[arm][max(final[arm])]
        closed.append((e - up) / (e - m))
        fe, fm, fup = (final_loss(exp, name, samples) for name in (FIXED_E, FIXED_ME, arm))
        closed_final.append((fe - fup) / (fe - fm))
        jumps = ", ".join(f"{json.loads((exp.out / name / MARKER).read_text())['warm_start']['jump']:+.4f}"
                          for name in expansions)
        lines.append(f"| {exp.cfg.seed} | {e:.4f} | {m:.4f} | {up:.4f} | {jumps} | {closed[-1]:.1%} "
                     f"| {fe:.4f} | {fm:.4f} | {fup:.4f} | {closed_final[-1]:.1%} |")
    mean, std = mean_std(closed)
    fmean, fstd = mean_std(closed_final)
    lines.append(f"| mean ± std | | | | | {mean:.1%} ± {std:.1%} | | | | {fmean:.1%} ± {fstd:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a named reproduce config or a config file")
    parser.add_argument("--seeds", required=True, help="comma-separated, e.g. 0,1,2,3")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None, help="the data source, for a config that names none (pd-english)")
    parser.add_argument("--data-cache", default=None)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each one process)")
    parser.add_argument("--upcycled", action="store_true", help="also run and report the main upcycled arm")
    parser.add_argument("--staged", action="store_true", help="also run and report the staged-growth arm")
    parser.add_argument("--control", action="store_true",
                        help="also run and report the control: the main arm's source continued without expansion")
    parser.add_argument("--final-samples", type=int, default=None,
                        help="validation sequences of the final evaluation (default: the config's final_val_samples)")
    args = parser.parse_args()
    try:
        base = load_config(args.config, **({"data": args.data} if args.data else {}))
        require_data(base)
        seeds = [int(s) for s in args.seeds.split(",")]
        exps = [Experiment(dataclasses.replace(base, seed=s, seeds=()), Path(args.out) / f"seed-{s}",
                           args.data_cache) for s in seeds]
        # Runs that start together may each prepare the data; the cache keeps the first complete copy.
        jobs = [(exp, chain) for exp in exps for chain in jobs_of(exp, args.upcycled, args.staged, args.control)]
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: run_chain(*job), jobs))
        curves = {exp.cfg.seed: (val_curve(exp.out / FIXED_E), val_curve(exp.out / FIXED_ME)) for exp in exps}
        print(f"{base.name}: {base.num_experts} vs {base.big_experts} experts, {base.total_steps} steps, "
              f"data {base.data}, seeds {args.seeds}")
        print(lead_table(curves, (base.num_experts, base.big_experts)))
        plan = make_plan(exps[0].cfg)
        samples = args.final_samples or base.final_val_samples
        if args.upcycled:
            print()
            print(upcycled_table(exps, plan.main.label, plan.main.cpt, (plan.main.expanded,), samples))
        if args.staged:
            print()
            print(upcycled_table(exps, plan.staged.label, plan.staged.cpt, plan.staged.expanded, samples))
        if args.control:
            print()
            print(upcycled_table(exps, "control", plan.control, (), samples))
        for exp in exps:  # the copy diagnostics of the arms run here, where they were recorded
            plot_copies(exp.out, plan, exp.out / "copies.png")
    except UserError as err:
        sys.exit(f"regime_lead: {err}")


if __name__ == "__main__":
    main()
