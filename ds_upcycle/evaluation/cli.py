"""`ds-upcycle eval` and `ds-upcycle compare`: parse options, build a config, call the library.

Register with the `ds-upcycle` group: `main.add_command(eval_command)`,
`main.add_command(compare_command)`.
"""

from __future__ import annotations

import click

from ..accelerator import chooses_accelerator
from ..choices import DTYPE_NAMES, SPLITS
from ..errors import user_errors


def _limit(ctx, param, value: str | None) -> float | None:
    """--limit N (documents) or a fraction < 1; a click callback, so that a bad value names the option."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number") from None
    if number <= 0:
        raise click.BadParameter("must be positive")
    return int(number) if number >= 1 else number


@click.command("eval")
@click.argument("checkpoint")
@click.option("--tasks", default="synthetic", show_default=True,
              help="comma-separated suites (paper11, synthetic, or a suite .yaml) and lm-eval task/group names")
@click.option("--num-fewshot", type=int, default=None, help="shots for every task (default: each task's setting)")
@click.option("--limit", default=None, callback=_limit,
              help="documents per task (N, or a fraction < 1), for quick checks")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda or cuda:1")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
@click.option("--max-length", type=int, default=None,
              help="context window in tokens (default: the checkpoint's training sequence length)")
@click.option("--max-gen-toks", type=int, default=256, show_default=True,
              help="generation length when a task does not set one")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
              help="reuse keys and values while generating")
@click.option("--data-dir", default=None,
              help="local copies of hub datasets: DIR/<dataset_path>/<dataset_name>/<split>.jsonl|.parquet")
@click.option("--include-path", "include_paths", multiple=True, help="another lm-eval task folder (repeatable)")
@click.option("--offline", is_flag=True, help="never try the network: local data and caches only")
@click.option("--output", default=None, help="results file (default: eval_results.json in the checkpoint)")
@click.option("--log-samples", is_flag=True, help="also write every request and response next to the results")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bootstrap-iters", type=int, default=0, show_default=True, help="resamples for standard errors")
@click.option("--val-samples", type=int, default=256, show_default=True,
              help="sequences of the checkpoint's own data split for the validation loss (0: skip)")
@click.option("--val-split", type=click.Choice(SPLITS), default="val", show_default=True)
@click.option("--data-cache", default=None,
              help="prepared-data cache (default $DS_UPCYCLE_CACHE or ~/.cache/ds_upcycle)")
@user_errors
@chooses_accelerator
def eval_command(checkpoint, tasks, num_fewshot, limit, batch_size, device, dtype, max_length, max_gen_toks,
                 kv_cache, data_dir, include_paths, offline, output, log_samples, seed, bootstrap_iters,
                 val_samples, val_split, data_cache) -> None:
    """Evaluate CHECKPOINT (a save directory or a tag directory) with lm-evaluation-harness.

    Runs on one device, whatever layout trained the checkpoint. Writes lm-eval's results plus a
    `ds_upcycle` summary (headline score per task, average, validation loss) for `compare`.
    """
    from .run import EvalConfig, run_eval

    cfg = EvalConfig(checkpoint=checkpoint, tasks=tuple(tasks.split(",")), num_fewshot=num_fewshot,
                     limit=limit, batch_size=batch_size, device=device, dtype=dtype, max_length=max_length,
                     max_gen_toks=max_gen_toks, kv_cache=kv_cache, data_dir=data_dir,
                     include_paths=tuple(include_paths), offline=offline, output=output, log_samples=log_samples,
                     seed=seed, bootstrap_iters=bootstrap_iters, val_samples=val_samples, val_split=val_split,
                     data_cache=data_cache)
    report = run_eval(cfg)
    click.echo(results_table(report.results["ds_upcycle"], cfg.limit, cfg.val_samples))
    click.echo(f"results written to {report.path}")


def results_table(summary: dict, limit: float | None, val_samples: int) -> str:
    """Scores with their metric, the average, the validation loss with where it comes from."""
    tasks = summary["tasks"]
    rows = [(task, str(t["metric"] or "-"), "-" if t["value"] is None else f"{100 * t['value']:.1f}")
            for task, t in tasks.items()]
    if summary.get("average") is not None:
        rows.append(("average", "", f"{100 * summary['average']:.1f}"))
    width = [max(len(r[i]) for r in rows + [("task", "metric", "score")]) for i in range(3)]
    lines = [f"{'task':<{width[0]}}  {'metric':<{width[1]}}  {'score':>{width[2]}}"]
    lines += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]
    documents = ("every document" if limit is None else
                 f"the first {limit:g} documents" if limit >= 1 else f"the first {100 * limit:g}% of documents")
    lines.append(f"scores in % on {documents} of each task{'' if limit is None else f' (--limit {limit:g})'}")
    measured = summary.get("val_loss_measured_on")
    if measured:
        lines.append(f"validation loss {summary['val_loss']:.4f}, measured on {measured['sequences']} sequences "
                     f"of the {measured['split']} split")
    elif summary.get("val_loss") is not None:
        why = "--val-samples 0: not measured" if val_samples == 0 else "not measured here"
        lines.append(f"validation loss {summary['val_loss']:.4f}, recorded by training at step "
                     f"{summary['global_step']} ({why})")
    elif val_samples == 0:
        lines.append("validation loss skipped (--val-samples 0)")
    return "\n".join(lines)


@click.command("compare")
@click.argument("results", nargs=-1, required=True)
@click.option("--label", "labels", multiple=True, help="column name per run, in order (repeatable)")
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv"]), default="markdown", show_default=True)
@click.option("--plot", "plot_path", default=None, help="also draw the scores as grouped bars into this image file")
@click.option("--train-runs", nargs=3, default=None, metavar="FIXED_E UPCYCLED_CPT FIXED_ME",
              help="training save dirs (or metrics.jsonl) of the three runs: adds the compute ledger")
@click.option("--output-dir", default=None, help="also write compare.md and compare.json into this directory")
@user_errors
@chooses_accelerator
def compare_command(results, labels, fmt, plot_path, train_runs, output_dir) -> None:
    """Compare evaluation RESULTS (results files or checkpoints) side by side.

    With three runs given as FIXED_E UPCYCLED FIXED_ME, adds the share of the gap closed.
    """
    from ..atomic import check_writable
    from .compare import compare, plot, to_csv, to_json, to_markdown, write_outputs
    from .ledger import ledger_from_runs

    if output_dir:
        check_writable(f"{output_dir}/compare.md", "--output-dir")
    if plot_path:
        check_writable(plot_path, "--plot")
    comparison = compare(list(results), list(labels) or None)
    ledger = ledger_from_runs(*train_runs) if train_runs else None
    markdown = to_markdown(comparison) + ("\n" + ledger.to_markdown() if ledger else "")
    click.echo(markdown if fmt == "markdown" else to_csv(comparison), nl=False)
    if output_dir:
        for path in write_outputs(output_dir, markdown, to_json(comparison, ledger)):
            click.echo(f"written {path}")
    if plot_path:
        click.echo(f"plot written to {plot(comparison, plot_path)}")
