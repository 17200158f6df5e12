"""train.py's command line: parsed once into the config objects, never passed around."""

from __future__ import annotations

import argparse

from ..config import PRESETS
from ..data.config import DataConfig
from ..trust import trust_checkpoints
from .config import TrainConfig
from .scoring import ScoreConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train or continue training a DeepSpeed MoE language model.",
        epilog="Launch with: deepspeed [--num_gpus N] train.py --deepspeed_config ds_configs/<name>.json ...")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (optimizer, ZeRO, precision)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)

    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help=f"preset: {', '.join(PRESETS)} (default tiny; "
                   "ignored when starting from a checkpoint, which carries its model)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set num_experts=16 (repeatable)")

    d = p.add_argument_group("data")
    d.add_argument("--data", default=DataConfig.source, help="'synthetic[:docs=N,seed=S]', a .txt/.jsonl/.parquet "
                   f"file or directory, or a hub dataset name (default: {DataConfig.source})")
    d.add_argument("--text-field", default=DataConfig.text_field)
    d.add_argument("--split", default=TrainConfig.split, choices=["pretrain", "cpt"])
    d.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    d.add_argument("--vocab-size", type=int, default=None, help="size of the tokenizer trained on the data "
                   f"(default {DataConfig.vocab_size}; a run started from a checkpoint keeps its tokenizer)")
    d.add_argument("--tokenizer", default=None, help="existing tokenizer to use instead of training one "
                   "(SentencePiece .model, tokenizer.json, or a directory holding one)")
    d.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction)
    d.add_argument("--cpt-fraction", type=float, default=DataConfig.cpt_fraction,
                   help="share of documents in the continued pre-training split")
    d.add_argument("--data-cache", default=None, help="prepared-data cache (default $DS_UPCYCLE_CACHE "
                   "or ~/.cache/ds_upcycle)")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps in this stage (required unless "
                   "--score-experts)")
    t.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    t.add_argument("--decay-fraction", type=float, default=TrainConfig.decay_fraction, help="final LR decay share of the stage")
    t.add_argument("--min-lr-ratio", type=float, default=TrainConfig.min_lr_ratio)
    t.add_argument("--fresh-schedule", action="store_true",
                   help="start a new LR stage from --load, keeping its optimizer state (CPT)")
    t.add_argument("--keep-data-position", action="store_true",
                   help="with --fresh-schedule: continue from the --load checkpoint's place in the same split")
    t.add_argument("--micro-batch-size", type=int, default=None, help="overrides the DeepSpeed config")
    t.add_argument("--grad-accum-steps", type=int, default=None, help="overrides the DeepSpeed config")
    t.add_argument("--ep-size", type=int, default=TrainConfig.ep_size, help="expert-parallel size")
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--eval-interval", type=int, default=TrainConfig.eval_interval)
    t.add_argument("--eval-samples", type=int, default=TrainConfig.eval_samples)
    t.add_argument("--save", dest="save_dir", default=None, help="checkpoint directory (resumes if it has one)")
    t.add_argument("--save-interval", type=int, default=TrainConfig.save_interval)
    t.add_argument("--load", dest="load_dir", default=None, help="checkpoint to start from")
    t.add_argument("--trust-checkpoints", action="store_true",
                   help="load checkpoints whose pickles hold classes outside DeepSpeed's own (unpickling such a file "
                        "can run code: only for checkpoints you vouch for); default: such files are refused")
    t.add_argument("--exit-at", type=int, default=None, metavar="STEP",
                   help="stop after this global step with a checkpoint; run again without it (or with a later step) to go on")

    s = p.add_argument_group("expert scores (instead of training; then ds-upcycle expand --scores FILE)")
    s.add_argument("--score-experts", dest="score_output", default=None, metavar="FILE",
                   help="measure every expert's utility scores of the --load checkpoint on this job's layout "
                        "and write them to FILE; trains nothing")
    s.add_argument("--score-batches", type=int, default=ScoreConfig.batches,
                   help="calibration batches of the config's global batch size (default %(default)s)")
    s.add_argument("--score-data", default=ScoreConfig.data, help="'source' (the checkpoint's cpt split, the "
                   "default) or a data source as --data takes it")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trust_checkpoints:
        trust_checkpoints()
    if args.score_output is None and args.steps is None:
        parser.error("the following arguments are required: --steps (or --score-experts FILE)")
    if args.score_output is not None:
        if args.steps is not None:
            parser.error("--score-experts scores a checkpoint instead of training it: drop --steps")
        if args.load_dir is None:
            parser.error("--score-experts needs --load CHECKPOINT (the checkpoint to score)")
    return args


def score_config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(load_dir=args.load_dir, output=args.score_output, batches=args.score_batches,
                       data=args.score_data, ep_size=args.ep_size, data_cache=args.data_cache)


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, DataConfig]:
    data = DataConfig(source=args.data, text_field=args.text_field, seq_len=args.seq_len,
                      vocab_size=DataConfig.vocab_size if args.vocab_size is None else args.vocab_size,
                      tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                      cpt_fraction=args.cpt_fraction, cache_dir=args.data_cache)
    train = TrainConfig(steps=args.steps, split=args.split, warmup_steps=args.warmup_steps,
                        decay_fraction=args.decay_fraction, min_lr_ratio=args.min_lr_ratio,
                        fresh_schedule=args.fresh_schedule, keep_data_position=args.keep_data_position,
                        eval_interval=args.eval_interval,
                        eval_samples=args.eval_samples, save_interval=args.save_interval, seed=args.seed,
                        ep_size=args.ep_size, save_dir=args.save_dir, load_dir=args.load_dir, exit_at=args.exit_at)
    return train, data
