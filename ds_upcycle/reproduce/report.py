"""Tables of the experiment: compare's table and ledger for the main arm, a summary of every arm.

Everything here is recomputed from files on disk (results files, metrics.jsonl, manifests), so the
report of a resumed or finished experiment can always be rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_text_atomic
from ..checkpoint import find_checkpoint
from ..evaluation.compare import compare, to_json, to_markdown, write_outputs
from ..evaluation.ledger import ledger_from_runs
from .config import ReproduceConfig
from .plan import FIXED_E, FIXED_ME, Plan


def results_path(out: Path, arm: str) -> Path:
    return out / "results" / f"{arm}.json"


def manifest(out: Path, expanded_arm: str) -> dict:
    return json.loads((find_checkpoint(out / expanded_arm).path / "upcycle_manifest.json").read_text())


def _labels(cfg: ReproduceConfig, arm_label: str) -> list[str]:
    return [f"Fixed-E ({cfg.num_experts})", arm_label, f"Fixed-mE ({cfg.big_experts})"]


def summarize(cfg: ReproduceConfig, plan: Plan, out: Path) -> dict:
    """The numbers of every arm, each upcycled arm's gap closed and compute ledger."""
    arms = []
    for arm in plan.upcycled:
        runs = [results_path(out, FIXED_E), results_path(out, arm.cpt), results_path(out, FIXED_ME)]
        comparison = compare([str(p) for p in runs], _labels(cfg, arm.label))
        loss_row = next(row for row in comparison.rows if row.kind == "loss")
        ledger = ledger_from_runs(out / FIXED_E, out / arm.cpt, out / FIXED_ME)
        arms.append({"arm": arm.cpt, "label": arm.label, "cpt_fraction": arm.cpt_fraction,
                     "transition_step": arm.transition, "select": arm.select,
                     "warm_start": manifest(out, arm.expanded).get("warm_start"),
                     "val_loss": loss_row.values[1], "gap_closed": loss_row.gap_closure(),
                     "scores": {row.name: row.values[1] for row in comparison.rows if row.kind == "score"},
                     "ledger": ledger.to_dict()})
    fixed = {name: json.loads(results_path(out, name).read_text())["ds_upcycle"] for name in (FIXED_E, FIXED_ME)}
    control = None
    if plan.control:
        loss = json.loads(results_path(out, plan.control).read_text())["ds_upcycle"].get("val_loss")
        control = {"arm": plan.control, "source": plan.main.source, "cpt_fraction": plan.main.cpt_fraction,
                   "val_loss": loss}
    staged = None
    if plan.staged:
        arm = plan.staged
        runs = [results_path(out, FIXED_E), results_path(out, arm.cpt), results_path(out, FIXED_ME)]
        loss_row = next(row for row in compare([str(p) for p in runs], _labels(cfg, arm.label)).rows
                        if row.kind == "loss")
        staged = {"arm": arm.cpt, "label": arm.label, "growth": [[s, n] for s, n in zip(arm.steps, arm.counts)],
                  "warm_starts": [manifest(out, name).get("warm_start") for name in arm.expanded],
                  "val_loss": loss_row.values[1], "gap_closed": loss_row.gap_closure()}
    return {"config": cfg.to_dict(), "total_steps": cfg.total_steps,
            "fixed_e": {"num_experts": cfg.num_experts, "val_loss": fixed[FIXED_E].get("val_loss")},
            "fixed_me": {"num_experts": cfg.big_experts, "val_loss": fixed[FIXED_ME].get("val_loss")},
            "main_arm": plan.main.cpt, "upcycled": arms, "control": control, "staged": staged}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_markdown(summary: dict) -> str:
    cfg = summary["config"]
    e, me = summary["fixed_e"], summary["fixed_me"]
    lines = [f"# Upcycling experiment `{cfg['name']}`: {e['num_experts']} -> {me['num_experts']} experts, "
             f"T = {summary['total_steps']} steps", "",
             "| arm | CPT | select | warm start: source -> expanded (jump) | validation loss | gap closed |",
             "| --- | ---: | --- | --- | ---: | ---: |",
             f"| Fixed-E ({e['num_experts']}) | - | - | - | {e['val_loss']:.4f} | - |"]
    defined = me["val_loss"] < e["val_loss"]  # otherwise there is no gap to close
    for arm in summary["upcycled"]:
        ws = arm["warm_start"]
        jump = "-" if not ws else f"{ws['source_loss']:.4f} -> {ws['expanded_loss']:.4f} ({ws['jump']:+.4f})"
        gap = _pct(arm["gap_closed"]) if defined else "n/a"
        lines.append(f"| {arm['arm']} | {_pct(arm['cpt_fraction'])} | {arm['select']} | {jump} | "
                     f"{arm['val_loss']:.4f} | {gap} |")
    control = summary.get("control")
    if control:
        lines.append(f"| {control['arm']} (control: {e['num_experts']} experts, no expansion) | "
                     f"{_pct(control['cpt_fraction'])} | - | - | {control['val_loss']:.4f} | - |")
    staged = summary.get("staged")
    if staged:
        jumps = ", ".join("-" if not ws else f"{ws['jump']:+.4f}" for ws in staged["warm_starts"])
        gap = _pct(staged["gap_closed"]) if defined else "n/a"
        lines.append(f"| {staged['arm']} ({staged['label']}) | - | {cfg['select']} | jumps {jumps} | "
                     f"{staged['val_loss']:.4f} | {gap} |")
    lines.append(f"| Fixed-mE ({me['num_experts']}) | - | - | - | {me['val_loss']:.4f} | - |")
    lines += ["", "Gap closed = (L_fixedE - L_upcycled) / (L_fixedE - L_fixedmE) on validation loss; the warm "
              "start is measured on the first validation sequences right after expansion."
              + ("" if defined else " n/a: Fixed-mE is not better than Fixed-E, so there is no gap to close."), "",
              "| arm | t_E (ms) | t_mE (ms) | t_mE / t_E | fixed mE cost (s) | upcycled cost (s) | saving | "
              "saving, E checkpoint exists |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in summary["upcycled"]:
        led = arm["ledger"]
        lines.append(f"| {arm['arm']} | {1000 * led['step_time_e']:.1f} | {1000 * led['step_time_me']:.1f} | "
                     f"{led['step_time_ratio']:.3f} | {led['fixed_cost_s']:.1f} | {led['upcycled_cost_s']:.1f} | "
                     f"{_pct(led['saving'])} | {_pct(led['saving_with_source'])} |")
    lines += ["", "Costs from the median measured step times of the Fixed-E and Fixed-mE runs: fixed T * t_mE, "
              "upcycled T0 * t_E + (T - T0) * t_mE."]
    return "\n".join(lines) + "\n"


def write_report(cfg: ReproduceConfig, plan: Plan, out: Path) -> dict:
    """compare.md/.json (main arm, with the ledger) and summary.md/.json (all arms) under out/results."""
    results = out / "results"
    main = plan.main
    runs = [str(results_path(out, name)) for name in (FIXED_E, main.cpt, FIXED_ME)]
    comparison = compare(runs, _labels(cfg, main.label))
    ledger = ledger_from_runs(out / FIXED_E, out / main.cpt, out / FIXED_ME)
    write_outputs(results, to_markdown(comparison) + "\n" + ledger.to_markdown(), to_json(comparison, ledger))
    summary = summarize(cfg, plan, out)
    for name, text in (("summary.md", summary_markdown(summary)), ("summary.json", json.dumps(summary, indent=2))):
        write_text_atomic(results / name, text)
    return summary
