"""`ds-upcycle reproduce` over several seeds: the report against the seeds' own summaries, and
staged growth in a whole run."""

import json
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from ds_upcycle.checkpoint import read_metrics
from ds_upcycle.errors import UserError
from ds_upcycle.reproduce.config import load_config
from ds_upcycle.reproduce.outdir import check_out_dir
from ds_upcycle.reproduce.plan import make_plan
from ds_upcycle.reproduce.plots import budget_rows
from ds_upcycle.reproduce.seeds import aggregate, seed_markdown, write_seed_report
from test_reproduce import MINI


def summary(seed: int, e: float, me: float, up: float, jump: float, control: float) -> dict:
    """The shape of one seed's results/summary.json (only the fields the report reads)."""
    arm = {"arm": "upcycled-cpt50-grad_sq", "label": "upcycled", "cpt_fraction": 0.5, "select": "grad_sq",
           "val_loss": up, "gap_closed": (e - up) / (e - me), "warm_start": {"jump": jump},
           "ledger": {"saving": 0.1 + seed / 100, "step_time_ratio": 1.2}}
    return {"config": {"name": "mini", "seed": seed}, "total_steps": 16, "main_arm": arm["arm"],
            "fixed_e": {"num_experts": 4, "val_loss": e}, "fixed_me": {"num_experts": 8, "val_loss": me},
            "upcycled": [arm], "control": {"arm": "continued-e-cpt50", "cpt_fraction": 0.5, "val_loss": control}}


def test_every_figure_is_mean_and_sample_std_over_seeds():
    runs = {0: summary(0, 1.00, 0.90, 0.93, 0.05, 0.98), 1: summary(1, 1.02, 0.91, 0.95, 0.07, 0.99),
            2: summary(2, 0.99, 0.88, 0.90, 0.04, 0.97)}
    report = aggregate(runs)
    e = [1.00, 1.02, 0.99]
    me = [0.90, 0.91, 0.88]
    assert report["fixed_e"]["val_loss"]["mean"] == pytest.approx(statistics.mean(e))
    assert report["fixed_e"]["val_loss"]["std"] == pytest.approx(statistics.stdev(e))
    assert report["fixed_e"]["val_loss"]["values"] == {"0": 1.00, "1": 1.02, "2": 0.99}
    gaps = [a - b for a, b in zip(e, me)]
    pooled = ((statistics.stdev(e) ** 2 + statistics.stdev(me) ** 2) / 2) ** 0.5
    assert report["capacity_gap"]["mean"] == pytest.approx(statistics.mean(gaps))
    assert report["capacity_gap"]["in_pooled_std"] == pytest.approx(statistics.mean(gaps) / pooled)
    (arm,) = report["upcycled"]
    closed = [(a - u) / (a - b) for a, b, u in zip(e, me, [0.93, 0.95, 0.90])]
    assert arm["gap_closed"]["mean"] == pytest.approx(statistics.mean(closed))
    assert arm["warm_start_jump"]["std"] == pytest.approx(statistics.stdev([0.05, 0.07, 0.04]))
    assert report["control"]["val_loss"]["mean"] == pytest.approx(0.98)
    text = seed_markdown(report)
    assert f"| Fixed-E (4) | - | - | {statistics.mean(e):.4f} ± {statistics.stdev(e):.4f} (1.0000, 1.0200, 0.9900)" \
        in text


def test_cpt_budget_rows_follow_the_main_rule_by_share(tmp_path):
    runs = {}
    for seed, e, me in ((0, 1.00, 0.90), (1, 1.02, 0.91)):
        run = summary(seed, e, me, 0.95, 0.05, 0.99)
        base = run["upcycled"][0]
        run["upcycled"] += [{**base, "arm": f"upcycled-cpt{round(100 * f)}-{rule}", "cpt_fraction": f,
                             "select": rule, "val_loss": up, "gap_closed": (e - up) / (e - me)}
                            for f, rule, up in ((0.9, "grad_sq", 0.97 + seed / 100), (0.1, "grad_sq", 1.01),
                                                (0.25, "uniform", 0.99))]
        run["config"]["select"] = "grad_sq"
        runs[seed] = run
    report = aggregate(runs)
    rows = budget_rows(report["upcycled"], "grad_sq")
    assert [f for f, _ in rows] == [0.1, 0.5, 0.9]           # sorted, uniform left out
    assert rows[2][1] == pytest.approx([(1.00 - 0.97) / 0.10, (1.02 - 0.98) / 0.11])
    assert budget_rows(runs[0]["upcycled"], "uniform") == [(0.25, [pytest.approx(0.1)])]  # one run: one value
    write_seed_report(report, tmp_path)
    assert (tmp_path / "cpt_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_in_configs_and_on_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("base: tiny\nseeds: [0, 1, 2]\n")
    assert load_config(str(tmp_path / "c.yaml")).seeds == (0, 1, 2)
    assert load_config("tiny", seeds=(3, 4)).seeds == (3, 4)
    for bad in ("seeds: [0, 0]\n", "seeds: [-1]\n", "seeds: [a]\n"):
        (tmp_path / "bad.yaml").write_text("base: tiny\n" + bad)
        with pytest.raises(UserError, match="seeds"):
            load_config(str(tmp_path / "bad.yaml"))


@pytest.mark.slow
def test_more_seeds_reuse_an_experiment_directory_another_config_is_refused(tmp_path):
    check_out_dir(load_config("tiny", seeds=(0, 1)), tmp_path)
    check_out_dir(load_config("tiny", seeds=(0, 1, 2)), tmp_path)  # one more seed: the same experiment
    assert json.loads((tmp_path / "config.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(UserError, match=r"different config \(total_steps differ\)"):
        check_out_dir(load_config("tiny", seeds=(0, 1, 2), total_steps=2400), tmp_path)


def test_two_seeds_with_staged_growth_end_to_end(tmp_path, data_cache):
    """Two seeds of a config with a staged-growth arm: the seed report against the seeds' own summaries,
    and seed 0's staged stages against Fixed-E's schedule and data."""
    config = tmp_path / "mini.json"
    # the sources are Fixed-E's own checkpoints (transition stable): per seed a copy and a CPT, and the
    # staged arm grown 4 -> 6 at step 4 and 6 -> 8 at step 8
    config.write_text(json.dumps({**MINI, "selection_cpt_fraction": None, "control": False, "tasks": [],
                                  "transition": "stable", "growth": [[0.25, 6], [0.5, 8]]}))
    plan = make_plan(load_config(str(config)))
    assert [s.name for s in plan.stages][-4:] == ["staged-expanded-6", "staged-6", "staged-expanded-8", "staged-8"]
    out = tmp_path / "exp"
    command = [sys.executable, "-m", "ds_upcycle.cli", "reproduce", "--config", str(config), "--out", str(out),
               "--data-cache", str(data_cache), "--seeds", "0,1"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results" / "summary.json").read_text())
    per_seed = {s: json.loads((out / f"seed-{s}" / "results" / "summary.json").read_text()) for s in (0, 1)}
    assert {s: per_seed[s]["config"]["seed"] for s in (0, 1)} == {0: 0, 1: 1}
    losses = [per_seed[s]["fixed_me"]["val_loss"] for s in (0, 1)]
    assert losses[0] != losses[1]       # different seeds, different runs
    assert report["fixed_me"]["val_loss"]["values"] == {"0": losses[0], "1": losses[1]}
    assert report["fixed_me"]["val_loss"]["std"] == pytest.approx(statistics.stdev(losses))
    staged_losses = {str(s): per_seed[s]["staged"]["val_loss"] for s in (0, 1)}
    assert report["staged"]["val_loss"]["values"] == staged_losses
    assert (out / "results" / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_staged_growth(out / "seed-0", plan)
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert again.returncode == 0 and "complete, skipped" in (out / "seed-0" / "reproduce.log").read_text()


def assert_staged_growth(out, plan):
    """Each stage runs at Fixed-E's learning rate (no re-warm, Fixed-E's anneal) and goes on with the
    data of the stage before; the summary reports the staged arm against the recorded losses."""
    fixed_e = {r["step"]: r["lr"] for r in read_metrics(out / "fixed-e" / "metrics.jsonl")}
    six, eight = (read_metrics(out / arm / "metrics.jsonl") for arm in ("staged-6", "staged-8"))
    assert [r["step"] for r in six] == list(range(5, 9)) and [r["step"] for r in eight] == list(range(9, 17))
    assert all(r["lr"] == pytest.approx(fixed_e[r["step"]]) for r in six + eight)
    assert [len(layer["shares"]) for layer in six[0]["load"]] == [6] * 4
    assert [len(layer["shares"]) for layer in eight[0]["load"]] == [8] * 4

    def cpt_samples(arm):
        tag = (out / arm / "latest").read_text().strip()
        state = torch.load(out / arm / tag / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
        return state["ds_upcycle"]["position"]["samples"]

    batch = MINI["micro_batch_size"]
    # the second stage went on with the cpt data after the first's (12 steps in all); one jump: 8 steps
    assert cpt_samples("staged-8") == 12 * batch and cpt_samples(plan.main.cpt) == 8 * batch
    summary = json.loads((out / "results" / "summary.json").read_text())
    staged, e, me = summary["staged"], summary["fixed_e"]["val_loss"], summary["fixed_me"]["val_loss"]
    assert staged["val_loss"] == json.loads((out / "results" / "staged-8.json").read_text())["ds_upcycle"]["val_loss"]
    assert staged["gap_closed"] == pytest.approx((e - staged["val_loss"]) / (e - me))
    assert staged["growth"] == [[4, 6], [8, 8]] and len(staged["warm_starts"]) == 2
    assert "staged 4 -> 6 -> 8 at steps 4, 8" in (out / "results" / "summary.md").read_text()
    assert (out / "results" / "copies.png").stat().st_size > 5000  # the staged stages' diagnostics too
