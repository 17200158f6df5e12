"""`ds-upcycle reproduce`: the paper's central experiment, end to end and resumable.

Runs the plan's stages in order (skipping complete ones), evaluates the final checkpoint of every
arm, then writes the tables and figures under OUT/results. Interrupted at any point, the same
command continues: a complete stage has its marker, an incomplete training stage resumes from its
own last checkpoint, an incomplete expansion is redone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from . import stages
from .config import ReproduceConfig, require_data
from .evaluate import evaluate_arm
from .experiment import Experiment
from .outdir import check_out_dir
from .plan import FIXED_E, BranchStage, ExpandStage, Plan, make_plan
from .plots import plot_copies, plot_cpt_budget, plot_loss, plot_routing
from .report import manifest, results_path, write_report
from .seeds import run_seeds


def run_stages(exp: Experiment, plan: Plan) -> None:
    cfg, out, say = exp.cfg, exp.out, exp.say
    for stage in plan.stages:
        arm_dir = out / stage.name
        if stages.is_complete(arm_dir):
            say(f"[{stage.name}] complete, skipped")
            continue
        if isinstance(stage, BranchStage):
            say(f"[{stage.name}] {stage.branch[0]} at step {stage.branch[1]}")
            record = stages.run_branch_stage(exp, stage)
        elif isinstance(stage, ExpandStage):
            say(f"[{stage.name}] expanding {stage.source} to {stage.num_experts or cfg.big_experts} experts "
                f"({stage.select})")
            record = stages.run_expand_stage(exp, stage)
            ws = record["warm_start"]
            say(f"[{stage.name}] warm start: validation loss {ws['source_loss']:.4f} -> {ws['expanded_loss']:.4f} "
                f"({ws['jump']:+.4f})")
        else:
            origin = (f"from {stage.load}" if stage.load else
                      f"continuing {stage.branch[0]} at step {stage.branch[1]}" if stage.branch else "from scratch")
            say(f"[{stage.name}] training {stage.steps} steps on {stage.split} {origin} (log: {arm_dir / 'train.log'})")
            record = stages.run_train_stage(exp, stage)
            say(f"[{stage.name}] done in {record['seconds']:.0f} s")
            if stage.name == FIXED_E and plan.branch_steps:
                # Branches are taken right away: only then may the other checkpoints go.
                for branched in plan.stages:
                    if getattr(branched, "branch", None) and not (out / branched.name / "latest").is_file():
                        stages.branch_checkpoint(out / FIXED_E, branched.branch[1], out / branched.name)
            stages.prune_checkpoints(arm_dir)
        stages.mark_complete(arm_dir, record)


def run_evaluations(exp: Experiment, plan: Plan) -> None:
    cfg, out, say = exp.cfg, exp.out, exp.say
    for arm in plan.evaluated:
        output = results_path(out, arm)
        if output.is_file():
            say(f"[{arm}] evaluated, skipped")
            continue
        say(f"[{arm}] evaluating ({', '.join(cfg.tasks) or 'validation loss only'})")
        started = time.perf_counter()
        evaluate_arm(exp, out / arm, output)
        loss = json.loads(output.read_text())["ds_upcycle"].get("val_loss")
        say(f"[{arm}] validation loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")


def run_reproduce(cfg: ReproduceConfig, out: str | Path, data_cache: str | None = None,
                  say: Callable[[str], None] = print) -> dict:
    """Run (or finish) the experiment of `cfg` in `out`; returns the summary of every arm (with
    `cfg.seeds`, of every arm over the seeds)."""
    require_data(cfg)
    out = Path(out)
    stages.repo_root()
    stages.deepspeed_config_path(cfg)
    check_out_dir(cfg, out)
    exp = Experiment(cfg, out, data_cache, say)
    if cfg.seeds:
        return run_seeds(exp)
    plan = make_plan(cfg)
    started = time.perf_counter()
    run_stages(exp, plan)
    run_evaluations(exp, plan)
    summary = write_report(cfg, plan, out)
    manifests = {arm.expanded: manifest(out, arm.expanded) for arm in plan.upcycled}
    figures = out / "results"
    plot_loss(out, plan, manifests, figures / "loss.png", cfg.num_experts, cfg.big_experts)
    plot_routing(out, plan.main, manifests[plan.main.expanded], figures / "routing.png")
    plot_copies(out, plan, figures / "copies.png")
    if summary["fixed_me"]["val_loss"] < summary["fixed_e"]["val_loss"]:  # a gap to close
        plot_cpt_budget(summary["upcycled"], cfg.select, figures / "cpt_budget.png", cfg.total_steps)
    say(f"results in {figures} ({time.perf_counter() - started:.0f} s this invocation)")
    return summary
