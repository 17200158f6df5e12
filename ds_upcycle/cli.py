"""The `ds-upcycle` command. Commands parse their options and call a library function."""

from __future__ import annotations

import functools
import sys

import click

from . import __version__
from .errors import UserError


def user_errors(fn):
    """Print UserError as one line and exit 2, instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            click.echo(f"ds-upcycle: error: {err}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ds-upcycle")
def main() -> None:
    """Expert upcycling for DeepSpeed Mixture-of-Experts models.

    Train with `deepspeed train.py --deepspeed_config ds_configs/<name>.json ...`.
    """


@main.command()
@click.option("--vocab-size", type=int, default=32000, show_default=True, help="vocabulary for the counts")
@user_errors
def presets(vocab_size: int) -> None:
    """List the model presets with their parameter counts."""
    from .config import PRESETS, count_parameters

    click.echo(f"{'preset':<12}{'layers':>7}{'dim':>6}{'experts':>8}{'top-k':>6}{'moe every':>10}"
               f"{'total':>10}{'active':>10}")
    for name, cfg in PRESETS.items():
        total, active = count_parameters(cfg.replace(vocab_size=vocab_size))
        click.echo(f"{name:<12}{cfg.n_layers:>7}{cfg.dim:>6}{cfg.num_experts:>8}{cfg.top_k:>6}"
                   f"{cfg.moe_layer_freq:>10}{total / 1e6:>9.1f}M{active / 1e6:>9.1f}M")


@main.command("prepare-data")
@click.option("--data", default="synthetic", show_default=True,
              help="'synthetic[:docs=N,seed=S]', a .txt/.jsonl/.parquet file or directory, or a hub dataset")
@click.option("--text-field", default="text", show_default=True)
@click.option("--vocab-size", type=int, default=2048, show_default=True)
@click.option("--tokenizer", default=None, help="existing SentencePiece model to use instead of training one")
@click.option("--val-fraction", type=float, default=0.05, show_default=True)
@click.option("--cpt-fraction", type=float, default=0.35, show_default=True)
@click.option("--data-cache", default=None, help="cache directory (default $DS_UPCYCLE_CACHE or ~/.cache/ds_upcycle)")
@user_errors
def prepare_data_cmd(data, text_field, vocab_size, tokenizer, val_fraction, cpt_fraction, data_cache) -> None:
    """Tokenize a data source into cached pretrain/cpt/val splits and print their sizes.

    train.py does this on first use; run it ahead to check a source or share a cache.
    """
    from .data import DataConfig, prepare_data

    cfg = DataConfig(source=data, text_field=text_field, vocab_size=vocab_size, tokenizer=tokenizer,
                     val_fraction=val_fraction, cpt_fraction=cpt_fraction, cache_dir=data_cache)
    prepared = prepare_data(cfg)
    meta = prepared.meta
    click.echo(f"{meta['source']}: vocabulary {meta['vocab_size']}, prepared in {prepared.path}")
    for split, counts in meta["splits"].items():
        click.echo(f"  {split:<9}{counts['documents']:>9,} documents {counts['tokens']:>13,} tokens")


if __name__ == "__main__":
    main()
