"""train.py started from a checkpoint: the command line wins over restored state, or is refused in one line.

Every case is a real train.py run on CPU; the LR of every step is checked against the WSD formula.
"""

import json
import shutil

import pytest
import torch

from conftest import SOURCE_MODEL, check_ok, run_train, tiny_run_args, train_refusal, write_ds_config
from ds_upcycle.data.tokenizer import train_tokenizer
from ds_upcycle.checkpoint import read_metrics

pytestmark = pytest.mark.slow

PEAK = 3e-3


def wsd(step_in_stage: int, total: int, warmup: int, decay_fraction: float, min_ratio: float) -> float:
    """The schedule's factor, written out from its definition (docs/TRAINING.md, "Schedule")."""
    decay_steps = max(1, round(decay_fraction * total))
    if step_in_stage < warmup:
        return (step_in_stage + 1) / warmup
    into_decay = step_in_stage - (total - decay_steps) + 1
    return 1.0 if into_decay <= 0 else 1.0 - (1.0 - min_ratio) * into_decay / decay_steps


def notes(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("note: ")]


def refused(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_cache):
    """A run saved at step 8 without an anneal (decay share 0.001), weight decay 0.1, betas (0.9, 0.999)."""
    root = tmp_path_factory.mktemp("continuation")
    cfg = write_ds_config(root / "ds.json", micro_batch=4)
    check_ok(run_train(tiny_run_args(cfg, 8, data_cache, "--save", str(root / "src"), "--decay-fraction", "0.001")))
    return root / "src"


def test_fresh_schedule_takes_every_setting_from_the_command_line(tmp_path, data_cache, source):
    cfg = write_ds_config(tmp_path / "ds.json", micro_batch=4, lr=1e-3)
    config = json.loads(cfg.read_text())
    config["optimizer"]["params"].update(weight_decay=0.5, betas=[0.8, 0.9])
    cfg.write_text(json.dumps(config))
    proc = check_ok(run_train(tiny_run_args(
        cfg, 6, data_cache, "--load", str(source), "--save", str(tmp_path / "cpt"), "--split", "cpt",
        "--fresh-schedule", "--warmup-steps", "1", "--decay-fraction", "0.5", "--min-lr-ratio", "0.2")))
    records = read_metrics(tmp_path / "cpt" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(9, 15))
    expected = [1e-3 * wsd(k, 6, 1, 0.5, 0.2) for k in range(6)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-9)
    assert expected[3] < expected[2] and records[-1]["lr"] == pytest.approx(2e-4)

    # The optimizer hyperparameters are the config's, not the checkpoint's: say so, and save them.
    assert "note: optimizer weight_decay 0.5 (--deepspeed_config) replaces the checkpoint's 0.1" in notes(proc)
    assert "note: optimizer betas [0.8, 0.9] (--deepspeed_config) replaces the checkpoint's [0.9, 0.999]" \
        in notes(proc)
    saved = torch.load(tmp_path / "cpt" / "global_step14" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       map_location="cpu", weights_only=False)
    groups = saved["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert {(g["weight_decay"], tuple(g["betas"])) for g in groups} == {(0.5, (0.8, 0.9))}


def test_new_stage_keeping_its_data_position_trains_on_the_batches_that_came_next(tmp_path, data_cache):
    """A new stage on the run's own split with --keep-data-position (reproduce's cpt_data "pretrain")
    takes the batches the run it starts from would have taken next: with that run's schedule from
    there on, it is that run, loss for loss."""
    cfg = write_ds_config(tmp_path / "ds.json", micro_batch=4)
    full, branch = tmp_path / "full", tmp_path / "branch"
    check_ok(run_train(tiny_run_args(cfg, 12, data_cache, "--save", str(full), "--save-interval", "6",
                                     "--warmup-steps", "1", "--decay-fraction", "0.25")))
    shutil.copytree(full / "global_step6", branch / "global_step6")
    (branch / "latest").write_text("global_step6")
    for name, keep in (("kept", ["--keep-data-position"]), ("restarted", [])):
        check_ok(run_train(tiny_run_args(cfg, 6, data_cache, "--load", str(branch), "--save", str(tmp_path / name),
                                         "--split", "pretrain", "--fresh-schedule", "--warmup-steps", "0",
                                         "--decay-fraction", "0.5", *keep)))
    reference = read_metrics(full / "metrics.jsonl")[6:]
    kept = read_metrics(tmp_path / "kept" / "metrics.jsonl")
    restarted = read_metrics(tmp_path / "restarted" / "metrics.jsonl")
    assert [r["step"] for r in kept] == [r["step"] for r in reference] == list(range(7, 13))
    assert [r["lr"] for r in kept] == pytest.approx([r["lr"] for r in reference], rel=1e-12)
    assert [r["loss"] for r in kept] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    # without it the stage starts from the split's first sample: other batches, other losses
    assert [r["loss"] for r in restarted] != pytest.approx([r["loss"] for r in reference], rel=1e-3)


def test_resumed_run_applies_changed_settings_and_names_them(tmp_path, data_cache, source):
    cfg = write_ds_config(tmp_path / "ds.json", micro_batch=4)
    run = tmp_path / "run"
    args = ["--save", str(run), "--save-interval", "4"]
    check_ok(run_train(tiny_run_args(cfg, 8, data_cache, *args)))
    # Interrupted after step 4; started again with other settings (and a stray --load).
    (run / "latest").write_text("global_step4")
    shutil.rmtree(run / "global_step8")
    proc = check_ok(run_train(tiny_run_args(
        cfg, 8, data_cache, *args, "--decay-fraction", "0.5", "--min-lr-ratio", "0.1", "--seed", "1",
        "--micro-batch-size", "2", "--split", "cpt", "--load", str(source))))
    assert set(notes(proc)) == {
        f"note: resuming {run / 'global_step4'}; --load applies only while --save holds no checkpoint",
        "note: --decay-fraction 0.5 applies from step 5 (the run was saved with 0.1)",
        "note: --min-lr-ratio 0.1 applies from step 5 (the run was saved with 0)",
        "note: --seed 1 applies from step 5 (the run was saved with 0)",
        "note: global batch size 2 applies from step 5 (the run was saved with 4)",
        "note: --split cpt applies from step 5, from its first sample (the run was saved on pretrain)",
    }
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records[4:]] == pytest.approx([PEAK * wsd(k, 8, 1, 0.5, 0.1) for k in range(4, 8)])
    assert [r["tokens"] - q["tokens"] for q, r in zip(records[3:], records[4:])] == [2 * 32] * 4
    info = json.loads((run / "global_step8" / "ds_upcycle.json").read_text())
    assert info["run"]["seed"] == 1 and info["run"]["global_batch"] == 2 and info["split"] == "cpt"


def test_same_command_resumes_without_notes(tmp_path, data_cache):
    cfg = write_ds_config(tmp_path / "ds.json", micro_batch=4)
    args = tiny_run_args(cfg, 4, data_cache, "--save", str(tmp_path / "run"), "--model", "tiny")
    check_ok(run_train(args))
    proc = check_ok(run_train(args[:3] + ["6"] + args[4:]))   # --steps 6: the stage grows
    assert notes(proc) == [f"note: --model tiny ignored: the model comes from checkpoint "
                           f"{tmp_path / 'run' / 'global_step4'}",
                           "note: --steps 6 applies from step 5 (the run was saved with 4)"]


def test_what_a_checkpoint_cannot_take_is_refused_or_named(tmp_path, data_cache, source, monkeypatch):
    cfg = write_ds_config(tmp_path / "ds.json", micro_batch=4)
    load = ["--load", str(source), "--save", str(tmp_path / "out")]
    line = refused(train_refusal(tiny_run_args(cfg, 1, data_cache, *load, "--set", "num_experts=8"), monkeypatch))
    assert line == (f"train.py: error: --set num_experts=8 does not fit checkpoint {source / 'global_step8'}, "
                    f"whose weights have num_experts 4; grow experts with ds-upcycle expand")
    line = refused(train_refusal(tiny_run_args(cfg, 1, data_cache, *load, "--set", "dim=96"), monkeypatch))
    assert "--set dim=96 does not fit" in line and "dim 64" in line

    other = train_tokenizer([f"document {i} about nothing in particular" for i in range(200)], 300,
                            tmp_path / "other.model")
    line = refused(train_refusal(tiny_run_args(cfg, 1, data_cache, *load, "--tokenizer", str(other)), monkeypatch))
    assert line.startswith(f"train.py: error: --tokenizer {other} is not the tokenizer of checkpoint")

    # Fields that do not shape a weight apply; --vocab-size cannot, and says so.
    proc = check_ok(run_train(tiny_run_args(cfg, 1, data_cache, *load, "--fresh-schedule", "--vocab-size", "1024",
                                            "--set", "route_bias_update=0.01")))
    assert (f"note: --vocab-size 1024 ignored: the model keeps the tokenizer of checkpoint "
            f"{source / 'global_step8'}") in notes(proc)
    info = json.loads((tmp_path / "out" / "global_step9" / "ds_upcycle.json").read_text())
    assert info["model"]["route_bias_update"] == 0.01 and info["model"]["vocab_size"] <= 512


def test_optimizer_state_resumes_only_on_its_layout(tmp_path, data_cache, trained_source, monkeypatch):
    """The shared source was saved by 2 processes with ep_size 2: one process is refused before
    anything runs, with the reshard that works."""
    src, cfg = trained_source["src"], trained_source["cfg"]
    line = refused(train_refusal(tiny_run_args(cfg, 13, data_cache, *SOURCE_MODEL, "--load", str(src),
                                               "--save", str(tmp_path / "run")), monkeypatch))
    assert (f"{trained_source['tag']} was saved on world size 2 with ep_size 2, and its optimizer state resumes only "
            f"there (this job: world size 1, ep_size 1); reshard it first: ds-upcycle expand {trained_source['tag']} "
            f"NEW -m 1 --world-size 1 --ep-size 1") in line
    assert not (tmp_path / "run").exists()
