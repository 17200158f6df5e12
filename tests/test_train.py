"""train.py end to end: real DeepSpeed on CPU, 1 and 2 processes."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, bf16_ds_config, check_ok, launch_env, launcher, run_train, train_refusal,
                      write_ds_config)
from ds_upcycle.checkpoint import read_metrics
from ds_upcycle.moe.names import moe_prefix, router_bias

pytestmark = pytest.mark.slow


def test_loss_falls_and_metrics_are_recorded(tmp_path, train_args):
    cfg = write_ds_config(tmp_path / "ds.json", stage=1, micro_batch=8)
    proc = check_ok(run_train(train_args(cfg, 40, "--save", str(tmp_path / "run"), "--eval-interval", "20")))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[-1]["loss"] < records[0]["loss"] - 1.5
    assert records[-1]["val_loss"] < records[19]["val_loss"]
    assert {"tokens", "lr", "step_time", "tokens_per_s", "load"} <= set(records[0])
    assert [layer["layer"] for layer in records[0]["load"]] == [0, 1, 2, 3]
    assert f"validation loss {records[-1]['val_loss']:.4f} at step 40" in proc.stdout
    info = json.loads((tmp_path / "run" / "global_step40" / "ds_upcycle.json").read_text())
    assert info["model"]["dim"] == 64 and info["tokens_seen"] == 40 * 8 * 32
    assert (tmp_path / "run" / "global_step40" / "tokenizer.model").is_file()


def test_resume_reproduces_uninterrupted_run(tmp_path, train_args):
    cfg = write_ds_config(tmp_path / "ds.json", stage=2, micro_batch=4, grad_accum=2)
    run = tmp_path / "run"
    check_ok(run_train(train_args(cfg, 12, "--save", str(run), "--save-interval", "6", "--eval-interval", "6")))
    full = read_metrics(run / "metrics.jsonl")
    # Pretend the run died after step 6: drop the final checkpoint and start the same command again.
    (run / "latest").write_text("global_step6")
    shutil.rmtree(run / "global_step12")
    check_ok(run_train(train_args(cfg, 12, "--save", str(run), "--save-interval", "6", "--eval-interval", "6")))
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["lr"] == b["lr"] and ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
        assert a["load"] == b["load"]


def test_exit_at_stops_with_a_checkpoint_and_the_stage_resumes_as_if_uninterrupted(tmp_path, train_args):
    cfg = write_ds_config(tmp_path / "ds.json", stage=2, micro_batch=4)
    check_ok(run_train(train_args(cfg, 8, "--save", str(tmp_path / "full"), "--eval-interval", "4")))
    split = tmp_path / "split"
    proc = check_ok(run_train(train_args(cfg, 8, "--save", str(split), "--eval-interval", "4", "--exit-at", "5")))
    assert "at step 5" in proc.stdout and (split / "latest").read_text().strip() == "global_step5"
    check_ok(run_train(train_args(cfg, 8, "--save", str(split), "--eval-interval", "4")))
    full, resumed = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]


def test_fresh_schedule_starts_cpt_stage(tmp_path, train_args):
    cfg = write_ds_config(tmp_path / "ds.json", micro_batch=4)
    check_ok(run_train(train_args(cfg, 8, "--save", str(tmp_path / "pre"))))
    check_ok(run_train(train_args(cfg, 6, "--load", str(tmp_path / "pre"), "--save", str(tmp_path / "cpt"),
                                  "--split", "cpt", "--fresh-schedule", "--warmup-steps", "3")))
    records = read_metrics(tmp_path / "cpt" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(9, 15))
    assert records[0]["lr"] == pytest.approx(3e-3 / 3) and records[2]["lr"] == pytest.approx(3e-3)
    assert records[0]["tokens"] == 9 * 4 * 32
    info = json.loads((tmp_path / "cpt" / "global_step14" / "ds_upcycle.json").read_text())
    assert info["split"] == "cpt"


@pytest.mark.distributed
def test_two_processes_expert_parallel_match_one_process(tmp_path, train_args):
    one = write_ds_config(tmp_path / "one.json", micro_batch=8)
    two = write_ds_config(tmp_path / "two.json", micro_batch=4)
    check_ok(run_train(train_args(one, 6, "--save", str(tmp_path / "a"), "--eval-interval", "3")))
    shared_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    check_ok(run_train(train_args(two, 6, "--save", str(tmp_path / "b"), "--eval-interval", "3",
                                  "--ep-size", "2"), num_procs=2, runner=True))  # `deepspeed`, as the README runs it
    # DeepSpeed's CPU shared-memory segments (about 69 MB of RAM per rank) do not outlive the run
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shared_before
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    # Same global batch, same layout-independent init: the same training run, up to float reordering.
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        if "val_loss" in ra:
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)
    tag = tmp_path / "b" / "global_step6"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert len(list(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4 * 4


@pytest.mark.distributed
def test_bias_update_uses_load_summed_over_ranks(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([*launcher(2), str(ROOT / "tests" / "workers" / "balance_worker.py"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    # summed load [5, 1, 2, 8], mean 4: experts 0 and 3 are over-loaded
    assert result["bias"] == [-0.25, 0.25, 0.25, -0.25]
    assert result["stats"][0]["max_share"] == pytest.approx(8 / 16)


@pytest.mark.parametrize("extra,message", [
    (["--model", "tinny"], "unknown model preset 'tinny' (did you mean 'tiny'?)"),
    (["--data", "no/such/file.txt"], "data file not found: no/such/file.txt"),
    (["--load", "no-such-checkpoint"], "checkpoint not found: no-such-checkpoint"),
    (["--set", "num_experts=6", "--ep-size", "4"], "num_experts 6 is not divisible by --ep-size 4"),
])
def test_bad_input_gives_one_line(tmp_path, train_args, extra, message, monkeypatch):
    """train.py's main in this process: each refusal comes before the processes meet and before
    anything is written. The launched path of a refusal is
    test_world_size_not_divisible_by_ep_size's."""
    cfg = write_ds_config(tmp_path / "ds.json")
    if "--ep-size" in extra:
        monkeypatch.setenv("WORLD_SIZE", "4")
    args = train_args(cfg, 2, *extra, "--save", str(tmp_path / "run"))
    proc = train_refusal(args, monkeypatch)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"train.py: error: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_world_size_not_divisible_by_ep_size(tmp_path, train_args):
    cfg = write_ds_config(tmp_path / "ds.json")
    proc = run_train(train_args(cfg, 2, "--ep-size", "3", "--set", "num_experts=6"), num_procs=2)
    assert proc.returncode != 0
    assert "train.py: error: world size 2 is not divisible by --ep-size 3" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bf16_run_keeps_routing_bias_in_fp32(tmp_path, train_args):
    cfg = bf16_ds_config(tmp_path / "bf16.json")
    check_ok(run_train(train_args(cfg, 4, "--save", str(tmp_path / "run"))))
    module = torch.load(tmp_path / "run" / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module["tok_embeddings.weight"].dtype == torch.bfloat16
    bias = module[router_bias(moe_prefix(0))]
    # sums of +-1e-3 steps stay exact multiples of 1e-3 only because the bias is kept in fp32
    assert bias.dtype == torch.float32 and bias.abs().max() > 0
    assert ((bias * 1000).round() - bias * 1000).abs().max() < 1e-3
