"""`ds-upcycle eval` and `ds-upcycle compare` as a user runs them."""

import json
import re
import shutil

import click
import pytest
import torch
from click.testing import CliRunner

from conftest import check_ok, expand_cli
from ds_upcycle.checkpoint import find_checkpoint, read_metrics
from ds_upcycle.evaluation.cli import compare_command, eval_command
from eval_helpers import offline_hub, trained_checkpoint  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("offline_hub")


@click.group()
def cli():
    """Stands in for the ds-upcycle group the commands are registered with."""


cli.add_command(eval_command)
cli.add_command(compare_command)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    """A copy of the shared trained run: eval writes its results into the checkpoint."""
    copy = tmp_path_factory.mktemp("eval-cli") / "run"
    shutil.copytree(trained_checkpoint(tmp_path_factory, data_cache), copy)
    return copy


def write_results(path, scores: dict, val_loss: float):
    path.write_text(json.dumps({"results": {}, "ds_upcycle": {
        "checkpoint": str(path.parent / path.stem / "global_step10"), "val_loss": val_loss,
        "tasks": {t: {"metric": "acc,none", "value": v} for t, v in scores.items()}}}))
    return str(path)


def test_eval_writes_results_into_the_checkpoint(checkpoint, data_cache):
    result = CliRunner().invoke(cli, ["eval", str(checkpoint), "--tasks", "synthetic_facts_mc", "--limit", "16",
                                      "--offline", "--batch-size", "4", "--val-samples", "16",
                                      "--data-cache", str(data_cache)])
    assert result.exit_code == 0, result.output
    written = checkpoint / "global_step200" / "eval_results.json"
    summary = json.loads(written.read_text())["ds_upcycle"]
    # the same 16 validation sequences train.py scored at its last step, through DeepSpeed's engine
    recorded = [r for r in read_metrics(checkpoint / "metrics.jsonl") if r["step"] == 200][0]["val_loss"]
    assert summary["val_loss"] == pytest.approx(recorded, abs=1e-5)
    assert summary["val_loss_measured_on"] == {"split": "val", "sequences": 16}
    assert f"validation loss {summary['val_loss']:.4f}, measured on 16 sequences of the val split" in result.output
    score = summary["tasks"]["synthetic_facts_mc"]["value"]
    assert re.search(rf"^synthetic_facts_mc +acc,none +{100 * score:.1f}$", result.output, re.M), result.output
    assert "scores in % on the first 16 documents of each task (--limit 16)" in result.output
    assert summary["eval_config"]["device"] == "cpu"
    skipped = CliRunner().invoke(cli, ["eval", str(checkpoint), "--tasks", "synthetic_facts_mc", "--limit", "2",
                                       "--offline", "--val-samples", "0", "--device", "cuda", "--output",
                                       str(checkpoint.parent / "skipped.json")])
    assert skipped.exit_code == 0, skipped.output
    assert "recorded by training at step 200 (--val-samples 0: not measured)" in skipped.output
    if not torch.cuda.is_available():  # the results name the device that ran, not the one asked for
        assert json.loads((checkpoint.parent / "skipped.json").read_text())["ds_upcycle"]["eval_config"][
            "device"] == "cpu"
    assert f"results written to {written}" in result.output
    assert summary["eval_config"]["limit"] == 16 and summary["eval_config"]["batch_size"] == 4
    # compare finds it through the checkpoint
    table = CliRunner().invoke(cli, ["compare", str(checkpoint), "--label", "E4"])
    assert table.exit_code == 0 and f"| synthetic_facts_mc | {100 * score:.1f} |" in table.output


def test_compare_measures_the_gap_closed(tmp_path):
    runs = [write_results(tmp_path / "fixed4.json", {"a": 0.40, "b": 0.20, "c": 0.50}, 2.0),
            write_results(tmp_path / "up8.json", {"a": 0.55, "b": 0.30, "c": 0.60}, 1.8),
            write_results(tmp_path / "fixed8.json", {"a": 0.60, "b": 0.25, "c": 0.45}, 1.7)]
    result = CliRunner().invoke(cli, ["compare", *runs, "--plot", str(tmp_path / "plot.png")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| task | fixed4/global_step10 | up8/global_step10 | fixed8/global_step10 | gap closed |"
    assert "| a | 40.0 | 55.0 | 60.0 | 75.0% |" in lines            # (55 - 40) / (60 - 40)
    assert "| b | 20.0 | 30.0 | 25.0 | 200.0% |" in lines
    assert "| c | 50.0 | 60.0 | 45.0 | - |" in lines  # Fixed-mE behind: no gap to close
    assert "| average (3 tasks) | 36.7 | 48.3 | 43.3 | 175.0% |" in lines
    assert "| validation loss | 2.0000 | 1.8000 | 1.7000 | 66.7% |" in lines  # (2.0 - 1.8) / (2.0 - 1.7)
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    csv = CliRunner().invoke(cli, ["compare", *runs[:2], "--format", "csv", "--label", "E", "--label", "U"])
    assert csv.output.splitlines()[:2] == ["task,E,U", "a,40.0,55.0"]


def test_user_errors_are_one_line(tmp_path, checkpoint):
    runner = CliRunner()
    missing = runner.invoke(cli, ["compare", str(tmp_path / "none.json")])
    assert missing.exit_code == 2
    assert missing.output.strip() == (f"ds-upcycle: error: no evaluation results at {tmp_path / 'none.json'}; "
                                      f"run `ds-upcycle eval` first")
    labels = runner.invoke(cli, ["compare", str(tmp_path / "a.json"), "--label", "x", "--label", "y"])
    assert labels.exit_code == 2 and "2 labels for 1 runs" in labels.output
    batch = runner.invoke(cli, ["eval", str(checkpoint), "--batch-size", "0"])
    assert batch.exit_code == 2 and batch.output.strip() == "ds-upcycle: error: --batch-size must be >= 1, got 0"
    limit = runner.invoke(cli, ["eval", str(checkpoint), "--limit", "-1"])
    assert limit.exit_code == 2 and "Invalid value for '--limit': must be positive" in limit.output
    unknown = runner.invoke(cli, ["eval", str(checkpoint), "--tasks", "synthetic_facts_mcq", "--offline"])
    assert unknown.exit_code == 2
    assert unknown.output.strip().splitlines()[-1] == (
        "ds-upcycle: error: unknown task 'synthetic_facts_mcq' (did you mean 'synthetic_facts_mc'?)")


def write_metrics(run_dir, steps, step_time):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "step_time": step_time + (0.5 if s == steps[0] else 0.0)}) + "\n" for s in steps))
    return str(run_dir)


def test_compute_ledger_arithmetic(tmp_path):
    from ds_upcycle.evaluation.ledger import ComputeLedger

    ledger = ComputeLedger(step_time_e=1.0, step_time_me=1.5, total_steps=100, transition_step=50)
    assert ledger.fixed_cost == 150 and ledger.upcycled_cost == 50 * 1.0 + 50 * 1.5
    assert ledger.saving == pytest.approx(50 * 0.5 / 150)           # T0 (t_mE - t_E) / (T t_mE)
    assert ledger.saving_with_source == pytest.approx(0.5)          # only the CPT is paid

    runs = [write_results(tmp_path / "fixed4.json", {"a": 0.40}, 2.0),
            write_results(tmp_path / "up8.json", {"a": 0.55}, 1.8),
            write_results(tmp_path / "fixed8.json", {"a": 0.60}, 1.7)]
    train = [write_metrics(tmp_path / "e4", range(1, 101), 1.0),
             write_metrics(tmp_path / "up8-cpt", range(51, 101), 1.5),  # CPT records start after T0 = 50
             write_metrics(tmp_path / "e8", range(1, 101), 1.5)]
    result = CliRunner().invoke(cli, ["compare", *runs, "--train-runs", *train, "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| upcycled (E pre-training + CPT) | 125.0 | 16.7% |" in result.output
    summary = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert summary["ledger"]["transition_step"] == 50 and summary["ledger"]["step_time_e"] == 1.0
    assert summary["rows"][-1]["gap_closed"] == pytest.approx(2 / 3)
    assert "Compute ledger" in (tmp_path / "out" / "compare.md").read_text()


def test_compare_names_runs_by_role_and_plots_the_loss(tmp_path, checkpoint):
    """Columns by what the run records say a run is: grown by `expand` or trained at its expert count."""
    check_ok(expand_cli(str(checkpoint), str(tmp_path / "up"), "-m", "2", "--select", "uniform"))
    fixed, upcycled = find_checkpoint(checkpoint), find_checkpoint(tmp_path / "up")
    experts = fixed.run_record.model.num_experts
    runs = []
    for name, ref, loss in (("e.json", fixed, 2.0), ("u.json", upcycled, 1.9), ("e2.json", fixed, 1.95)):
        (tmp_path / name).write_text(json.dumps({"ds_upcycle": {"checkpoint": str(ref.path), "val_loss": loss,
                                                                "tasks": {}}}))
        runs.append(str(tmp_path / name))
    result = CliRunner().invoke(cli, ["compare", *runs[:2], "--plot", str(tmp_path / "loss.png")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"| task | Fixed-{experts} | Upcycled {experts}->{2 * experts} |"
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"  # no scores: the loss alone is plotted
    twice = CliRunner().invoke(cli, ["compare", runs[0], runs[2]])
    where = f"{fixed.path.parent.name}/{fixed.path.name}"
    assert twice.output.splitlines()[0] == f"| task | Fixed-{experts} ({where}) | Fixed-{experts} ({where}) |"
