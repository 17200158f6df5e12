"""The `ds-upcycle` command. Commands parse their options and call a library function.

The options' allowed values come from choices.py, which imports nothing. The libraries behind the
commands are imported when a command runs (after `chooses_accelerator` has picked DeepSpeed's
accelerator): torch, DeepSpeed and lm-eval take seconds to import, which `--help` should not pay.
"""

from __future__ import annotations

import importlib.util

import click

from . import __version__, trust
from .accelerator import chooses_accelerator
from .choices import ALLOCATIONS, EXPORT_DTYPES, OPTIMIZER_STATE_MODES, SELECTION_RULES
from .config import PRESETS, count_parameters
from .data.config import DataConfig
from .errors import UserError, user_errors
from .evaluation.cli import compare_command, eval_command
from .quick_exit import exit_process
from .upcycle.config import ExpandConfig, parse_layers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ds-upcycle")
@click.option("--trust-checkpoints", is_flag=True,
              help="read checkpoint files whose pickles hold classes outside DeepSpeed's own (unpickling such a "
                   "file can run code: only for checkpoints you vouch for); default: such files are refused")
def main(trust_checkpoints: bool) -> None:
    """Expert upcycling for DeepSpeed Mixture-of-Experts models.

    Train with `deepspeed train.py --deepspeed_config ds_configs/<name>.json ...`.
    """
    if trust_checkpoints:
        trust.trust_checkpoints()


@main.command()
@click.argument("source", type=click.Path())
@click.argument("destination", type=click.Path())
@click.option("--num-experts", type=int, default=None, help="target experts per MoE layer (N)")
@click.option("--multiplier", "-m", type=int, default=None, help="target = m x source experts; 1 reshards")
@click.option("--select", default=ExpandConfig.select, show_default=True,
              type=click.Choice(SELECTION_RULES),
              help="how copies are allocated: uniformly, or by a utility score (from the Adam state, "
                   "or from gradients on --calibration-data)")
@click.option("--layers", default=None, metavar="L[,L...]",
              help="grow only these MoE layers (indices L of layer_L_expert_* files, from 0); the others keep "
                   "their experts (default: every MoE layer)")
@click.option("--distinct-copies", is_flag=True,
              help="route each token to at most one copy of an expert (the copies form a group in the "
                   "model config): the expanded model computes what the source computed (exactly when every "
                   "expert gets the same number of copies)")
@click.option("--split-copies", is_flag=True,
              help="with --distinct-copies: pull each expert's copies apart along the direction in which its "
                   "tokens' router inputs vary most (measured on --calibration-data, default the source's cpt "
                   "split), so each copy starts with the tokens on its side")
@click.option("--split-scale", type=float, default=ExpandConfig.split_scale, show_default=True,
              help="difference of two copies' router logits one standard deviation from the middle of the split")
@click.option("--lift-groups-after", type=int, default=None, metavar="STEPS",
              help="with --distinct-copies: lift the groups after this many training steps (recorded in the "
                   "checkpoint: every train.py run that continues it lifts at that step)")
@click.option("--reinit-fraction", type=float, default=ExpandConfig.reinit_fraction, show_default=True,
              help="redraw this share of each replica's hidden units from the model's init (1: random new "
                   "experts; the paper's negative baselines)")
@click.option("--allocate", default=ExpandConfig.allocate, show_default=True, type=click.Choice(ALLOCATIONS),
              help="how a utility score becomes copy counts: in proportion to the scores, or the paper's "
                   "rank fill (best-ranked experts first, up to --max-copies each, the rest single)")
@click.option("--max-copies", type=int, default=None,
              help="cap on the copies of one expert (--allocate rank: default 4, raised only where 4 cannot reach "
                   "the target)")
@click.option("--router-noise", type=float, default=ExpandConfig.router_noise, show_default=True,
              help="std of the N(0, sigma^2) noise on the replicas' routing bias")
@click.option("--router-noise-relative", is_flag=True,
              help="the noise's std is --router-noise times the spread of the replicas' copied biases (the "
                   "paper's code; zero when the biases are all equal)")
@click.option("--optimizer-state", default=ExpandConfig.optimizer_state, show_default=True,
              type=click.Choice(OPTIMIZER_STATE_MODES),
              help="replicas' Adam moments: the source's, zeros, or the source's scaled by 1/copies; 'fresh' "
                   "writes no Adam state at all (training continues with a new Adam, as in the paper's code)")
@click.option("--world-size", type=int, default=None, help="target data-parallel world size (default: source's)")
@click.option("--ep-size", type=int, default=None, help="target expert-parallel size (default: source's)")
@click.option("--seed", type=int, default=ExpandConfig.seed, show_default=True)
@click.option("--dry-run", is_flag=True, help="print the allocation plan per layer, write nothing")
@click.option("--show-plan", is_flag=True,
              help="print every expert's copies and new ids, not one summary line per layer (the manifest "
                   "upcycle_manifest.json holds the full plan either way)")
@click.option("--force", is_flag=True, help="replace a non-empty destination")
@click.option("--check-data", is_flag=True,
              help="after writing, print the validation loss of the source and the expanded model on the "
                   "source's own validation data (the warm-start jump) and record it in the manifest")
@click.option("--check-samples", type=int, default=ExpandConfig.check_samples, show_default=True,
              help="validation sequences for --check-data")
@click.option("--data-cache", default=None,
              help="where --check-data and --calibration-data find the tokenized data "
                   "(default $DS_UPCYCLE_CACHE or ~/.cache/ds_upcycle)")
@click.option("--calibration-data", default=None, metavar="DATA",
              help="score experts by exact gradients on this data instead of the Adam state: 'source' (the "
                   "cpt split of the source's training data) or 'synthetic[:...]', a .txt/.jsonl/.parquet "
                   "file or directory, tokenized with the source's tokenizer")
@click.option("--calibration-batches", type=int, default=ExpandConfig.calibration_batches, show_default=True,
              help="batches of --calibration-data (the first ones, in order)")
@click.option("--calibration-batch-size", type=int, default=ExpandConfig.calibration_batch_size, show_default=True,
              help="sequences per calibration batch (of the source's seq_len)")
@click.option("--scores", "scores_file", default=None, metavar="FILE",
              help="utility scores of this checkpoint's experts written by train.py --score-experts (measured "
                   "on the training hardware), instead of the Adam state")
@user_errors
@chooses_accelerator
def expand(source, destination, num_experts, multiplier, select, layers, distinct_copies, split_copies, split_scale,
           lift_groups_after, reinit_fraction, allocate, max_copies, router_noise, router_noise_relative, optimizer_state,
           world_size, ep_size, seed, dry_run, show_plan, force, check_data, check_samples, data_cache, calibration_data,
           calibration_batches, calibration_batch_size, scores_file) -> None:
    """Expand a DeepSpeed MoE checkpoint SOURCE to more experts per layer, written to DESTINATION.

    SOURCE is a save directory with `latest` or a tag directory (no ZeRO, ZeRO 1 or 2, any
    data-parallel size and ep_size); DESTINATION is a new save directory that `engine.load_checkpoint` (and
    `train.py --load DESTINATION --fresh-schedule`) resumes from on the target layout.
    """
    from .upcycle.expand import expand_checkpoint
    from .upcycle.report import describe_plans

    cfg = ExpandConfig(source=source, destination=destination, num_experts=num_experts, multiplier=multiplier,
                       select=select, layers=parse_layers(layers), distinct_copies=distinct_copies,
                       split_copies=split_copies, split_scale=split_scale, lift_groups_after=lift_groups_after,
                       reinit_fraction=reinit_fraction,
                       allocate=allocate, max_copies=max_copies, router_noise=router_noise,
                       router_noise_relative=router_noise_relative,
                       optimizer_state=optimizer_state, world_size=world_size, ep_size=ep_size, seed=seed,
                       force=force, check_data=check_data, check_samples=check_samples, data_cache=data_cache,
                       calibration_data=calibration_data, calibration_batches=calibration_batches,
                       calibration_batch_size=calibration_batch_size, scores=scores_file)
    result = expand_checkpoint(cfg, dry_run=dry_run)
    click.echo(describe_plans(result.manifest, per_expert=show_plan))
    origin = result.manifest.get("scores", {})
    if origin.get("from") in ("calibration data", "scoring pass"):
        where = f" (train.py on {origin['world_size']} processes, {origin['file']})" if "file" in origin else ""
        click.echo(f"scores from gradients on {origin['batches']} batches ({origin['sequences']} sequences of "
                   f"{origin['seq_len']} tokens) of {origin['description']}{where}")
    elif origin.get("from") == "adam state":
        click.echo("scores from the checkpoint's Adam state")
    if not dry_run:
        click.echo(f"wrote {result.destination / result.tag} in {result.manifest['seconds']:.1f} s")
        if result.warm_start is not None:
            click.echo(result.warm_start.describe())


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(EXPORT_DTYPES),
              help="precision of the written weights (the routing bias stays float32)")
@click.option("--force", is_flag=True, help="replace a non-empty OUT_DIR")
@user_errors
@chooses_accelerator
def export_cmd(checkpoint, out_dir, dtype, force) -> None:
    """Write CHECKPOINT as a transformers model directory OUT_DIR.

    CHECKPOINT is a save directory with `latest` or a tag directory, any layout. OUT_DIR gets
    config.json, safetensors weights, generation_config.json and the tokenizer, for
    `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and lm-eval's `hf` model; the transformers class
    is the one that computes exactly what the checkpoint's model computes.
    """
    _require_transformers("export")
    from .hf.export import export_checkpoint

    result = export_checkpoint(checkpoint, out_dir, dtype=dtype, force=force)
    click.echo(f"wrote {result.out_dir}: {result.family.architecture}, {dtype}, "
               f"{len(result.weight_files)} weight file(s)")


@main.command("import")
@click.argument("hf_dir", type=click.Path())
@click.argument("out_checkpoint", type=click.Path())
@click.option("--force", is_flag=True, help="replace a non-empty OUT_CHECKPOINT")
@user_errors
@chooses_accelerator
def import_cmd(hf_dir, out_checkpoint, force) -> None:
    """Write the transformers MoE model in HF_DIR as a DeepSpeed checkpoint OUT_CHECKPOINT.

    HF_DIR is a local model directory (config.json, safetensors or .bin weights, its tokenizer).
    The checkpoint holds the module weights in the release's dtype and no optimizer state (as
    DeepSpeed saves an engine without one): `train.py --load OUT_CHECKPOINT` continues it on any
    layout and in any precision, and `ds-upcycle expand`, `eval` and `export` read it.
    """
    _require_transformers("import")
    from .hf.importer import import_checkpoint

    result = import_checkpoint(hf_dir, out_checkpoint, force=force)
    cfg = result.config
    click.echo(f"wrote {result.checkpoint} from {result.family.architecture}: {cfg.n_layers} layers, "
               f"{cfg.num_experts} experts, top-{cfg.top_k}")
    click.echo(result.balancing)


def _require_transformers(command: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise UserError(f"ds-upcycle {command} needs transformers: pip install 'ds-upcycle[hf]'")


@main.command()
@click.option("--vocab-size", type=int, default=32000, show_default=True, help="vocabulary for the counts")
@user_errors
@chooses_accelerator
def presets(vocab_size: int) -> None:
    """List the model presets with their parameter counts and the transformers class `export` writes."""
    from .hf.registry import export_class

    click.echo(f"{'preset':<12}{'layers':>7}{'dim':>6}{'experts':>8}{'top-k':>6}{'moe every':>10}"
               f"{'total':>10}{'active':>10}  exports as")
    for name, cfg in PRESETS.items():
        total, active = count_parameters(cfg.replace(vocab_size=vocab_size))
        click.echo(f"{name:<12}{cfg.n_layers:>7}{cfg.dim:>6}{cfg.num_experts:>8}{cfg.top_k:>6}"
                   f"{cfg.moe_layer_freq:>10}{total / 1e6:>9.1f}M{active / 1e6:>9.1f}M  {export_class(cfg)}")


@main.command("prepare-data")
@click.option("--data", default=DataConfig.source, show_default=True,
              help="'synthetic[:docs=N,seed=S]', a .txt/.jsonl/.parquet file or directory, or a hub dataset")
@click.option("--text-field", default=DataConfig.text_field, show_default=True)
@click.option("--vocab-size", type=int, default=DataConfig.vocab_size, show_default=True)
@click.option("--tokenizer", default=None,
              help="existing tokenizer to use instead of training one: a SentencePiece .model, a Hugging Face "
                   "tokenizer.json, or a model directory holding one")
@click.option("--val-fraction", type=float, default=DataConfig.val_fraction, show_default=True)
@click.option("--cpt-fraction", type=float, default=DataConfig.cpt_fraction, show_default=True)
@click.option("--data-cache", default=None, help="cache directory (default $DS_UPCYCLE_CACHE or ~/.cache/ds_upcycle)")
@user_errors
@chooses_accelerator
def prepare_data_cmd(data, text_field, vocab_size, tokenizer, val_fraction, cpt_fraction, data_cache) -> None:
    """Tokenize a data source into cached pretrain/cpt/val splits and print their sizes.

    train.py does this on first use; run it ahead to check a source or share a cache.
    """
    from .data.prepare import prepare_data

    cfg = DataConfig(source=data, text_field=text_field, vocab_size=vocab_size, tokenizer=tokenizer,
                     val_fraction=val_fraction, cpt_fraction=cpt_fraction, cache_dir=data_cache)
    prepared = prepare_data(cfg)
    meta = prepared.meta
    click.echo(f"{meta['source']}: vocabulary {meta['vocab_size']}, prepared in {prepared.path}")
    for split, counts in meta["splits"].items():
        click.echo(f"  {split:<9}{counts['documents']:>9,} documents {counts['tokens']:>13,} tokens")


@main.command()
@click.option("--config", "config", required=True,
              help="named config (tiny, stream, stream-staged, pd-english, gpu) or a .yaml/.json file of config fields")
@click.option("--out", required=True, type=click.Path(), help="experiment directory (re-run to resume)")
@click.option("--data", default=None, help="training text: replaces the config's data source")
@click.option("--data-cache", default=None, help="prepared-data cache (default $DS_UPCYCLE_CACHE or ~/.cache/ds_upcycle)")
@click.option("--seeds", default=None, metavar="S[,S...]",
              help="run the experiment once per seed and report mean ± std (replaces the config's seeds)")
@user_errors
@chooses_accelerator
def reproduce(config, out, data, data_cache, seeds) -> None:
    """Run the paper's central experiment: Fixed-E, Upcycled and Fixed-mE at the same token budget.

    Trains every arm with train.py, expands with `ds-upcycle expand`'s library, evaluates, and
    writes compare's table, the compute ledger, a summary and plots to OUT/results. Interrupted,
    the same command resumes and skips finished arms. With seeds, each seed runs in OUT/seed-<s>/
    and OUT/results reports every figure as mean ± std.
    """
    from .reproduce import load_config, run_reproduce

    run_reproduce(load_config(config, data=data, seeds=_seed_list(seeds)), out, data_cache=data_cache,
                  say=click.echo)


def _seed_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint="--seeds") from None


main.add_command(eval_command)
main.add_command(compare_command)


def run() -> None:
    """The `ds-upcycle` entry point: the command, then its exit status without the interpreter's
    final collections (ds_upcycle.quick_exit; click ends every command with SystemExit)."""
    try:
        main()
    except SystemExit as done:
        exit_process(done.code)


if __name__ == "__main__":
    run()
