"""The experiment over several seeds: one complete run per seed, then every figure as mean +- std.

Each seed is the whole experiment with `seed` set, run by `ds-upcycle reproduce` in its own
process and directory (OUT/seed-<s>/, resumable like any run), as many at a time as the cores
allow. The report (OUT/results/summary.md, summary.json, seeds.png) is recomputed from the seeds'
own summary.json files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import UserError
from .config import ReproduceConfig
from .experiment import Experiment
from .plots import plot_cpt_budget


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def parallel_runs(cfg: ReproduceConfig) -> int:
    """Seeds run at once: each uses num_procs processes of `threads` threads."""
    return max(1, min(len(cfg.seeds), (os.cpu_count() or 1) // (cfg.num_procs * cfg.threads)))


def _run_one(exp: Experiment, seed: int) -> Path:
    cfg, data_cache, say = exp.cfg, exp.data_cache, exp.say
    folder = seed_dir(exp.out, seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "seed_config.json"
    single = dataclasses.replace(cfg, seed=seed, seeds=())
    write_json_atomic(config, single.to_dict())
    command = [sys.executable, "-m", "ds_upcycle.cli", "reproduce", "--config", str(config), "--out", str(folder)]
    if data_cache:
        command += ["--data-cache", data_cache]
    say(f"[seed {seed}] running (log: {folder / 'reproduce.log'})")
    with (folder / "reproduce.log").open("a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code:
        raise UserError(f"seed {seed} failed (exit {code}); see {folder / 'reproduce.log'}")
    say(f"[seed {seed}] done")
    return folder / "results" / "summary.json"


def run_seeds(exp: Experiment) -> dict:
    """Run every seed (skipping finished work), then write the report over seeds."""
    cfg, out, say = exp.cfg, exp.out, exp.say
    with ThreadPoolExecutor(parallel_runs(cfg)) as pool:
        files = list(pool.map(lambda seed: _run_one(exp, seed), cfg.seeds))
    summaries = {seed: json.loads(path.read_text()) for seed, path in zip(cfg.seeds, files)}
    report = aggregate(summaries)
    write_seed_report(report, out / "results")
    say(f"results over seeds {', '.join(map(str, cfg.seeds))} in {out / 'results'}")
    return report


def spread(values: dict[int, float | None]) -> dict:
    """Mean, sample standard deviation and the per-seed values (seeds without a value left out)."""
    known = [v for v in values.values() if v is not None]
    return {"mean": statistics.fmean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else None,
            "values": {str(seed): value for seed, value in values.items()}}


def _arm_figures(summaries: dict[int, dict], arm: str) -> dict:
    picked = {seed: next(a for a in s["upcycled"] if a["arm"] == arm) for seed, s in summaries.items()}
    first = next(iter(picked.values()))
    return {"arm": arm, "label": first["label"], "cpt_fraction": first["cpt_fraction"], "select": first["select"],
            "val_loss": spread({s: a["val_loss"] for s, a in picked.items()}),
            "gap_closed": spread({s: a["gap_closed"] for s, a in picked.items()}),
            "warm_start_jump": spread({s: (a["warm_start"] or {}).get("jump") for s, a in picked.items()}),
            "saving": spread({s: a["ledger"]["saving"] for s, a in picked.items()}),
            "step_time_ratio": spread({s: a["ledger"]["step_time_ratio"] for s, a in picked.items()})}


def aggregate(summaries: dict[int, dict]) -> dict:
    """Every figure of the seeds' summaries as mean +- std, and the capacity gap in seed spreads."""
    first = next(iter(summaries.values()))
    fixed_e = spread({s: x["fixed_e"]["val_loss"] for s, x in summaries.items()})
    fixed_me = spread({s: x["fixed_me"]["val_loss"] for s, x in summaries.items()})
    gap = spread({s: x["fixed_e"]["val_loss"] - x["fixed_me"]["val_loss"] for s, x in summaries.items()})
    # The gap in units of the arms' seed-to-seed spread (pooled over Fixed-E and Fixed-mE).
    pooled = math.sqrt((fixed_e["std"] ** 2 + fixed_me["std"] ** 2) / 2) if fixed_e["std"] is not None else None
    report = {"config": {**first["config"], "seeds": list(summaries)}, "seeds": list(summaries),
              "total_steps": first["total_steps"],
              "fixed_e": {"num_experts": first["fixed_e"]["num_experts"], "val_loss": fixed_e},
              "fixed_me": {"num_experts": first["fixed_me"]["num_experts"], "val_loss": fixed_me},
              "capacity_gap": {**gap, "in_pooled_std": gap["mean"] / pooled if pooled else None},
              "main_arm": first["main_arm"],
              "upcycled": [_arm_figures(summaries, a["arm"]) for a in first["upcycled"]], "control": None}
    if first.get("staged"):
        report["staged"] = {"arm": first["staged"]["arm"], "label": first["staged"]["label"],
                            "val_loss": spread({s: x["staged"]["val_loss"] for s, x in summaries.items()}),
                            "gap_closed": spread({s: x["staged"]["gap_closed"] for s, x in summaries.items()})}
    if first.get("control"):
        report["control"] = {"arm": first["control"]["arm"], "cpt_fraction": first["control"]["cpt_fraction"],
                             "val_loss": spread({s: x["control"]["val_loss"] for s, x in summaries.items()})}
    return report


def _show(figure: dict, percent: bool = False) -> str:
    scale, unit, digits = (100, "%", 1) if percent else (1, "", 4)
    if figure["mean"] is None:
        return "n/a"
    mean = f"{scale * figure['mean']:.{digits}f}{unit}"
    std = "" if figure["std"] is None else f" ± {scale * figure['std']:.{digits}f}{unit}"
    values = ", ".join("-" if v is None else f"{scale * v:.{digits}f}" for v in figure["values"].values())
    return f"{mean}{std} ({values})"


def seed_markdown(report: dict) -> str:
    e, me, gap = report["fixed_e"], report["fixed_me"], report["capacity_gap"]
    seeds = ", ".join(map(str, report["seeds"]))
    lines = [f"# Upcycling experiment `{report['config']['name']}` over seeds {seeds}: {e['num_experts']} -> "
             f"{me['num_experts']} experts, T = {report['total_steps']} steps", "",
             "Every figure: mean ± sample standard deviation over the seeds (the per-seed values in seed order).", "",
             "| arm | CPT | select | validation loss | gap closed | warm-start jump | saving |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
             f"| Fixed-E ({e['num_experts']}) | - | - | {_show(e['val_loss'])} | - | - | - |"]
    defined = gap["mean"] > 0   # otherwise there is no gap to close
    for arm in report["upcycled"]:
        closed = _show(arm["gap_closed"], True) if defined else "n/a"
        lines.append(f"| {arm['arm']} | {100 * arm['cpt_fraction']:.1f}% | {arm['select']} | {_show(arm['val_loss'])} "
                     f"| {closed} | {_show(arm['warm_start_jump'])} | {_show(arm['saving'], True)} |")
    control = report.get("control")
    if control:
        lines.append(f"| {control['arm']} (control: no expansion) | {100 * control['cpt_fraction']:.1f}% | - | "
                     f"{_show(control['val_loss'])} | - | - | - |")
    staged = report.get("staged")
    if staged:
        closed = _show(staged["gap_closed"], True) if defined else "n/a"
        lines.append(f"| {staged['arm']} ({staged['label']}) | - | - | {_show(staged['val_loss'])} | {closed} "
                     f"| - | - |")
    lines.append(f"| Fixed-mE ({me['num_experts']}) | - | - | {_show(me['val_loss'])} | - | - | - |")
    ratio = gap["in_pooled_std"]
    lines += ["", f"Capacity gap L(Fixed-E) - L(Fixed-mE): {_show(gap)}"
              + ("" if ratio is None else f", {ratio:.1f} times the seed-to-seed spread of the two arms") + ".",
              "Gap closed = (L_fixedE - L_upcycled) / (L_fixedE - L_fixedmE) per seed; saving from each seed's "
              "measured step times." + ("" if defined else " n/a: Fixed-mE is not better than Fixed-E on average, "
                                                           "so there is no gap to close.")]
    return "\n".join(lines) + "\n"


def plot_seeds(report: dict, path: Path) -> Path:
    """Final validation loss of every arm: one dot per seed, the mean and its standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"Fixed-E ({report['fixed_e']['num_experts']})", report["fixed_e"]["val_loss"])]
    rows += [(arm["arm"], arm["val_loss"]) for arm in report["upcycled"]]
    if report.get("control"):
        rows.append(("control", report["control"]["val_loss"]))
    if report.get("staged"):
        rows.append((report["staged"]["arm"], report["staged"]["val_loss"]))
    rows.append((f"Fixed-mE ({report['fixed_me']['num_experts']})", report["fixed_me"]["val_loss"]))
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(rows) + 1.5))
    for y, (label, figure) in enumerate(rows):
        values = [v for v in figure["values"].values() if v is not None]
        ax.scatter(values, [y] * len(values), color="tab:gray", zorder=2, s=18)
        ax.errorbar([figure["mean"]], [y], xerr=[figure["std"] or 0], fmt="o", color="tab:red", capsize=4, zorder=3)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss (gray: each seed; red: mean ± std)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_seed_report(report: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.md", seed_markdown(report)), ("summary.json", json.dumps(report, indent=2))):
        write_text_atomic(results / name, text)
    plot_seeds(report, results / "seeds.png")
    if report["capacity_gap"]["mean"] > 0:  # a gap to close
        plot_cpt_budget(report["upcycled"], report["config"]["select"], results / "cpt_budget.png",
                        report["total_steps"])
