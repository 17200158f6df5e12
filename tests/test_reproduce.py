"""`ds-upcycle reproduce`: configs, the plan, and a miniature run of the whole experiment."""

import dataclasses
import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, SMALL_DATA, cli_in_process
from ds_upcycle.errors import UserError
from ds_upcycle.moe.balance import load_stats
from ds_upcycle.reproduce.config import NAMED_CONFIGS, load_config
from ds_upcycle.reproduce.experiment import Experiment
from ds_upcycle.reproduce.stages import train_args, write_scaled_deepspeed_config
from ds_upcycle.reproduce.plots import budget_rows
from ds_upcycle.reproduce.plan import BranchStage, ExpandStage, TrainStage, branch_step, make_plan
from ds_upcycle.checkpoint import read_metrics
from ds_upcycle.training.schedule import WSDSchedule

MINI = {"base": "tiny", "name": "mini", "model_overrides": ["dim=64", "dense_ffn_dim=128", "expert_ffn_dim=64"],
        "data": SMALL_DATA, "vocab_size": 512, "seq_len": 32, "total_steps": 16, "micro_batch_size": 4,
        "eval_interval": 4, "eval_samples": 16, "final_val_samples": 16, "tasks": ["synthetic"], "task_limit": 2,
        "transition": "annealed", "cpt_sweep": [], "seeds": []}


def lrs(total, warmup, decay_fraction, steps):
    """The learning-rate factor of a WSD stage at the given steps."""
    schedule = WSDSchedule(SimpleNamespace(param_groups=[{"lr": 1.0}]), total, warmup, decay_fraction)
    return [schedule.factor(step) for step in steps]


def test_load_stats_records_every_share():
    stats = load_stats(torch.tensor([1.0, 1.0, 2.0, 0.0]))
    assert stats["shares"] == [0.25, 0.25, 0.5, 0.0]


def test_named_and_file_configs(tmp_path):
    assert set(NAMED_CONFIGS) == {"tiny", "stream", "stream-staged", "pd-english", "gpu"}
    staged = make_plan(load_config("stream-staged")).staged
    assert (staged.steps, staged.counts) == ((1200, 2400), (6, 8))
    assert dataclasses.replace(NAMED_CONFIGS["stream-staged"], name="stream", growth=()) == NAMED_CONFIGS["stream"]
    tiny = load_config("tiny")
    assert (tiny.num_experts, tiny.big_experts, tiny.data) == (4, 8, "synthetic:entities=400,values=64")
    assert load_config("pd-english", data="texts/").data == "texts/"
    (tmp_path / "c.yaml").write_text("base: tiny\ntotal_steps: 40\nmodel_overrides: [dim=64]\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.total_steps == 40 and cfg.model_overrides == ("dim=64",) and cfg.name == "tiny"
    (tmp_path / "c.json").write_text(json.dumps(MINI))
    assert load_config(str(tmp_path / "c.json")).total_steps == 16
    # a file may start from another file, named relative to its own folder; later files win
    (tmp_path / "arms").mkdir()
    (tmp_path / "arms" / "d.yaml").write_text("base: ../c.yaml\nreinit_fraction: 1.0\ntotal_steps: 80\n")
    derived = load_config(str(tmp_path / "arms" / "d.yaml"))
    assert derived == dataclasses.replace(cfg, reinit_fraction=1.0, total_steps=80)


@pytest.mark.parametrize("text, message", [
    ("base: tiny\ntotal_step: 40\n", "unknown field 'total_step' (did you mean 'total_steps'?)"),
    ("base: tiny\ncpt_fraction: 1.5\n", "cpt_fraction must lie strictly between 0 and 1"),
    ("base: tiny\ntotal_steps: many\n", "total_steps must be int"),
    ("base: tiny\nmodel: huge\n", "unknown model preset 'huge'"),
    ("base: tiny\ndata: texts/\n", "synthetic tasks ask about the built-in corpus"),
    ("[1, 2", "not valid YAML"),
    ("base: tiny\ncpt_sweep: [0.1, 1.0]\n", "cpt_sweep must hold shares strictly between 0 and 1, got [0.1, 1.0]"),
    ("base: tiny\ncpt_sweep: [ten]\n", "config field cpt_sweep must be a list of numbers"),
    ("base: tiny\ncpt_sweep: [0.33]\n", "T0 = 3216 (cpt_fraction 0.33) is not a multiple"),
    ("base: tiny\ngrowth: [[0.25, 6], [0.5, 12]]\n", "rise from above num_experts 4 to num_experts * multiplier = 8"),
    ("base: tiny\ngrowth: [[0.5, 6], [0.25, 8]]\n", "the shares of T must rise strictly"),
    ("base: tiny\ngrowth: [[0.33, 6], [0.5, 8]]\n", "the first must be a multiple of Fixed-E's checkpoint interval"),
    ("base: tiny\ngrowth: [0.25, 8]\n", "growth must be a list of [share of T, experts] pairs"),
    ("base: tiny\ntransition: annealed\ngrowth: [[0.25, 8]]\n", "set transition: stable"),
    ("base: tine\n", "unknown base config 'tine'; choose from tiny, stream"),
    ("base: [tiny]\n", "base must name a config, got ['tiny']"),
    ("base: other.yaml\n", "base config file not found"),
    ("base: bad.yaml\ntotal_steps: 40\n", "its bases come round to"),
])
def test_bad_config_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(str(path))


def test_cli_bad_config_exits_with_one_line(tmp_path):
    """The first as a user runs it (the whole stderr of the process), the others in this process."""
    (tmp_path / "bad.yaml").write_text("base: tiny\nmultiplier: 1\n")
    as_user = subprocess.run([sys.executable, "-m", "ds_upcycle.cli", "reproduce", "--config",
                              str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, cwd=ROOT, check=False)
    for proc in (as_user, cli_in_process("reproduce", "--config", "tinny", "--out", str(tmp_path / "out"))):
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("ds-upcycle: error:")
    proc = cli_in_process("reproduce", "--config", "pd-english", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "needs --data" in proc.stderr and not (tmp_path / "out").exists()


def test_plan_shares_the_fixed_e_run_before_each_anneal():
    cfg = load_config("tiny", transition="annealed", cpt_sweep=())
    plan = make_plan(cfg)
    names = [s.name for s in plan.stages]
    assert names[:2] == ["fixed-e", "fixed-me"]
    assert {a.cpt for a in plan.upcycled} == {"upcycled-cpt50-grad_sq", "upcycled-cpt25-uniform",
                                              "upcycled-cpt25-grad_sq"}
    assert plan.main.transition == 2400 and plan.evaluated[:3] == ("fixed-e", "upcycled-cpt50-grad_sq", "fixed-me")
    for position, stage in enumerate(plan.stages):
        needs = [stage.source] if isinstance(stage, ExpandStage) else [stage.load, (stage.branch or [None])[0]]
        assert all(names.index(need) < position for need in needs if need), stage.name
        if isinstance(stage, TrainStage) and stage.branch:
            fixed_e = plan.stages[0]
            step = stage.branch[1]
            assert step % fixed_e.save_interval == 0
            # The LR of both schedules agrees up to and including the first step after the branch.
            assert step < stage.steps - cfg.decay_steps(stage.steps)
    assert branch_step(cfg, 2400) == 1920 and branch_step(cfg, 3600) == 3120


def test_stable_transition_continues_fixed_e_schedule_from_its_checkpoint():
    cfg = load_config("tiny")
    assert cfg.transition == "stable" and cfg.cpt_sweep == (0.1, 0.75, 0.9)
    plan = make_plan(cfg)
    fixed_e = plan.stages[0]
    sources = [s for s in plan.stages if isinstance(s, BranchStage)]
    assert {s.name: s.branch[1] for s in sources} == {"source-cpt50": 2400, "source-cpt25": 3600, "source-cpt10": 4320,
                                                      "source-cpt75": 1200, "source-cpt90": 480}
    assert {a.cpt for a in plan.upcycled if a.select == "grad_sq"} == {
        f"upcycled-cpt{n}-grad_sq" for n in (10, 25, 50, 75, 90)}
    assert all(s.branch[1] % fixed_e.save_interval == 0 for s in sources)
    cpt = [s for s in plan.stages if isinstance(s, TrainStage) and s.load]
    assert {s.name for s in cpt} >= {"upcycled-cpt50-grad_sq", "continued-e-cpt50"}


    # Every CPT step has the learning rate Fixed-E has at the same global step: no re-warm, same anneal
    # (also for a transition at the first step of Fixed-E's anneal, cpt10).
    fixed = lrs(cfg.total_steps, cfg.stage_warmup(cfg.total_steps), cfg.decay_fraction, range(cfg.total_steps))
    for stage in cpt:
        t0 = cfg.total_steps - stage.steps
        assert lrs(stage.steps, stage.warmup, stage.decay_fraction, range(stage.steps)) == fixed[t0:], stage.name
    with pytest.raises(UserError, match="inside Fixed-E's final anneal"):
        load_config("tiny", transition="stable", cpt_fraction=0.05, selection_cpt_fraction=None)
    with pytest.raises(UserError, match="not a multiple of Fixed-E's checkpoint interval"):
        load_config("tiny", transition="stable", cpt_fraction=0.33, selection_cpt_fraction=None)
    with pytest.raises(UserError, match="transition must be one of annealed, stable"):
        load_config("tiny", transition="late")


def test_cpt_data_pretrain_continues_the_source_data_in_every_cpt_stage():
    cfg = load_config("stream-staged", cpt_data="pretrain")
    plan = make_plan(cfg)
    cpt = [s for s in plan.stages if isinstance(s, TrainStage) and s.load]
    assert {s.name for s in cpt} >= {plan.main.cpt, plan.control, *plan.staged.trained}
    assert all(s.split == "pretrain" and s.keep_data_position for s in cpt)
    args = train_args(Experiment(cfg, Path("out")), next(s for s in cpt if s.name == plan.main.cpt))
    assert args[args.index("--split") + 1] == "pretrain" and "--keep-data-position" in args
    # the paper's protocol, the default: CPT on the cpt split from its first sample; staged stages
    # after the first continue the stage before
    default = make_plan(load_config("stream-staged"))
    stages = {s.name: s for s in default.stages if isinstance(s, TrainStage) and s.load}
    assert {s.split for s in stages.values()} == {"cpt"}
    assert [stages[name].keep_data_position for name in default.staged.trained] == [False, True]
    assert not any(s.keep_data_position for name, s in stages.items() if name not in default.staged.trained)
    with pytest.raises(UserError, match="cpt_data must be one of cpt, pretrain"):
        load_config("stream", cpt_data="train")


def test_cpt_lr_scale_trains_cpt_stages_on_a_scaled_copy_of_the_deepspeed_config(tmp_path):
    cfg = load_config("stream", cpt_batch_split=2, cpt_lr_scale=0.5)
    exp = Experiment(cfg, tmp_path / "out")
    shipped = ROOT / "ds_configs" / "zero2_fp32.json"
    for stage in (s for s in make_plan(cfg).stages if isinstance(s, TrainStage)):
        args = train_args(exp, stage)
        used = Path(args[args.index("--deepspeed_config") + 1])
        assert used == ((tmp_path / "out" / "ds_configs" / f"{stage.name}.json").resolve() if stage.load
                        else shipped.resolve()), stage.name
    scaled = tmp_path / "scaled.json"
    write_scaled_deepspeed_config(shipped, 0.5, scaled)
    expected = json.loads(shipped.read_text())
    expected["optimizer"]["params"]["lr"] /= 2
    assert json.loads(scaled.read_text()) == expected
    (tmp_path / "no-lr.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(UserError, match="scales the optimizer's lr, which .* does not set"):
        write_scaled_deepspeed_config(tmp_path / "no-lr.json", 0.5, scaled)
    with pytest.raises(UserError, match="cpt_lr_scale must be > 0"):
        load_config("stream", cpt_lr_scale=0.0)


def _digest(paths) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for root in paths for p in sorted(root.rglob("*")) if p.is_file()}


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _reproduce(config, out, cache):
    """Run from out's parent with a relative --out, as a user would (train.py runs elsewhere)."""
    return subprocess.run([sys.executable, "-m", "ds_upcycle.cli", "reproduce", "--config", str(config), "--out",
                           out.name, "--data-cache", str(cache)], capture_output=True, text=True, cwd=out.parent,
                          timeout=900, check=False)


@pytest.mark.slow
def test_cpt_batch_split_takes_smaller_steps_over_the_same_tokens():
    cfg = load_config("stream", cpt_batch_split=2)
    plan = make_plan(cfg)
    fixed = [s for s in plan.stages if isinstance(s, TrainStage) and not s.load]
    assert all(s.micro_batch_size is None for s in fixed)  # the fixed arms keep the config's batch
    fixed_lr = lrs(cfg.total_steps, cfg.stage_warmup(cfg.total_steps), cfg.decay_fraction, range(cfg.total_steps))
    for stage in (s for s in plan.stages if isinstance(s, TrainStage) and s.load):
        t0 = cfg.total_steps - stage.steps // 2
        assert stage.micro_batch_size == 8 and stage.steps * 8 == (cfg.total_steps - t0) * 16, stage.name
        # a small step has the LR of the Fixed-E step over the same tokens, to within one small step of the anneal
        small = lrs(stage.steps, stage.warmup, stage.decay_fraction, range(stage.steps))
        same_tokens = [fixed_lr[t0 + j // 2] for j in range(stage.steps)]
        assert small == pytest.approx(same_tokens, abs=1 / (cfg.decay_steps(cfg.total_steps) * 2) + 1e-12), stage.name
    args = train_args(Experiment(cfg, Path("out")), plan.stages[-1])
    assert args[args.index("--micro-batch-size") + 1] == "8"
    with pytest.raises(UserError, match="cpt_batch_split must divide"):
        load_config("stream", cpt_batch_split=3)


def test_miniature_experiment_end_to_end(tmp_path, data_cache):
    config = tmp_path / "mini.json"
    # grad_sq at 25% and 50% CPT, and the control: every kind of stage, each once (a selection arm,
    # uniform beside grad_sq, is one more of the same stages; make_plan's tests cover its planning)
    mini = {**MINI, "selection_cpt_fraction": None, "cpt_sweep": [0.25]}
    config.write_text(json.dumps(mini))
    out = tmp_path / "exp"
    proc = _reproduce(config, out, data_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(str(config))
    plan = make_plan(cfg)

    # Every stage is complete, with its checkpoint; expansions record their warm start.
    for stage in plan.stages:
        arm = out / stage.name
        assert (arm / "COMPLETE.json").is_file(), stage.name
        tag = (arm / "latest").read_text().strip()
        assert (arm / tag / "mp_rank_00_model_states.pt").is_file()
        assert [p.name for p in arm.glob("global_step*")] == [tag]  # intermediate checkpoints pruned
        if isinstance(stage, ExpandStage):
            manifest = json.loads((arm / tag / "upcycle_manifest.json").read_text())
            assert manifest["options"]["select"] == stage.select
            assert math.isfinite(manifest["warm_start"]["jump"])
    results = out / "results"
    for name in ("compare.md", "compare.json", "summary.md", "summary.json"):
        assert (results / name).stat().st_size > 0
    summary = json.loads((results / "summary.json").read_text())
    assert [f for f, _ in budget_rows(summary["upcycled"], "grad_sq")] == [0.25, 0.5]
    # The budget plot needs a gap to close (Fixed-mE better than Fixed-E), which 16 steps may not give.
    gap_defined = summary["fixed_me"]["val_loss"] < summary["fixed_e"]["val_loss"]
    assert (results / "cpt_budget.png").is_file() == gap_defined
    for name in ("loss.png", "routing.png", "copies.png"):
        data = (results / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        import matplotlib.image

        assert matplotlib.image.imread(results / name).shape[0] > 100

    # A source run is Fixed-E up to the branch, then its own stage end: the LR anneals to zero at T0.
    main = plan.main
    source = read_metrics(out / main.source / "metrics.jsonl")
    fixed_e = read_metrics(out / "fixed-e" / "metrics.jsonl")
    assert [r["step"] for r in source] == list(range(1, main.transition + 1))
    schedule = WSDSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3), total=main.transition,
                           warmup=cfg.stage_warmup(cfg.total_steps), decay_fraction=cfg.decay_fraction)
    for record in source:
        assert record["lr"] == pytest.approx(3e-3 * schedule.factor(record["step"] - 1)), record["step"]
    branch = json.loads((out / main.source / "BRANCHED_FROM.json").read_text())["step"]
    assert source[:branch] == fixed_e[:branch]

    # Per-expert load shares are recorded over CPT, one list per MoE layer, for the routing plot.
    cpt = read_metrics(out / main.cpt / "metrics.jsonl")
    for layer in cpt[0]["load"]:
        assert len(layer["shares"]) == cfg.big_experts and sum(layer["shares"]) == pytest.approx(1, abs=1e-4)
    # and at every evaluation, how far the copies have moved apart (the copies plot)
    assert all(len(r["copies"]) == len(cpt[0]["load"]) for r in cpt if "val_loss" in r)

    # The table's gap closed and the ledger follow from the recorded numbers.
    table = json.loads((results / "compare.json").read_text())
    loss_row = next(row for row in table["rows"] if row["name"] == "validation loss")
    l_e, l_up, l_me = loss_row["values"].values()
    recorded = [json.loads((results / f"{arm}.json").read_text())["ds_upcycle"]["val_loss"]
                for arm in ("fixed-e", main.cpt, "fixed-me")]
    assert [l_e, l_up, l_me] == recorded
    # compare shows a gap closed only where Fixed-mE is ahead (16 steps may not give that)
    assert loss_row["gap_closed"] == (pytest.approx((l_e - l_up) / (l_e - l_me)) if l_me < l_e else None)
    ledger = table["ledger"]
    t_e = _median([r["step_time"] for r in fixed_e])
    t_me = _median([r["step_time"] for r in read_metrics(out / "fixed-me" / "metrics.jsonl")])
    total, t0 = cfg.total_steps, main.transition
    assert (ledger["total_steps"], ledger["transition_step"]) == (total, t0) == (cpt[-1]["step"], cpt[0]["step"] - 1)
    assert ledger["step_time_e"] == pytest.approx(t_e) and ledger["step_time_me"] == pytest.approx(t_me)
    assert ledger["saving"] == pytest.approx(t0 * (t_me - t_e) / (total * t_me))
    assert ledger["saving_with_source"] == pytest.approx(t0 / total)
    summary = json.loads((results / "summary.json").read_text())
    for arm in summary["upcycled"]:
        l_arm = json.loads((results / f"{arm['arm']}.json").read_text())["ds_upcycle"]["val_loss"]
        assert arm["gap_closed"] == pytest.approx((l_e - l_arm) / (l_e - l_me))
        assert arm["ledger"]["transition_step"] == round(total * (1 - arm["cpt_fraction"]))
    # The control continues the main arm's source without expansion, over the same CPT steps.
    control = read_metrics(out / plan.control / "metrics.jsonl")
    assert [r["step"] for r in control] == [r["step"] for r in cpt]
    assert [r["lr"] for r in control] == [r["lr"] for r in cpt]
    assert all(len(layer["shares"]) == cfg.num_experts for layer in control[0]["load"])
    assert summary["control"]["val_loss"] == json.loads(
        (results / f"{plan.control}.json").read_text())["ds_upcycle"]["val_loss"]

    # A second invocation skips every arm and leaves their files alone.
    arms = [out / s.name for s in plan.stages]
    before = _digest(arms)
    started = time.perf_counter()
    again = _reproduce(config, out, data_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == len(plan.stages) + len(plan.evaluated)
    assert "training" not in again.stdout and "evaluating" not in again.stdout
    assert _digest(arms) == before
    assert time.perf_counter() - started < 60

    # Resuming after an interruption: only the arm without a marker runs again.
    last = plan.stages[-1]
    (out / last.name / "COMPLETE.json").unlink()
    resumed = _reproduce(config, out, data_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[{last.name}] training" in resumed.stdout and resumed.stdout.count("training") == 1
    assert (out / last.name / "COMPLETE.json").is_file()

    # The same directory refuses a different experiment.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**mini, "total_steps": 20}))
    refused = _reproduce(other, out, data_cache)
    assert refused.returncode == 2 and "different config (total_steps differ)" in refused.stderr
