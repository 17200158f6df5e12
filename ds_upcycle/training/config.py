"""Training-run configuration (what to run, for how long, where to save)."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import SPLITS
from ..errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """One training stage.

    Attributes:
        steps: optimizer steps in this stage (a resumed stage runs until it has done them all).
        split: data split to train on: "pretrain", or "cpt" for continued pre-training.
        warmup_steps: linear warmup at the start of the stage (default: 5% of the stage, >= 1).
        decay_fraction: the last fraction of the stage decays the LR linearly (the anneal).
        min_lr_ratio: LR at the end of the decay, as a fraction of the peak.
        fresh_schedule: start a new LR stage (and data position) from the --load checkpoint
            while keeping its optimizer state; use it when CPT starts from an expanded checkpoint.
        keep_data_position: with fresh_schedule, go on from the --load checkpoint's place in its
            data split (when it trained on the same split) rather than from the split's first
            sample: a stage of staged growth continues the data of the stage before it.
        eval_interval: validation every this many steps (and at the end); 0 = only at the end.
        eval_samples: validation sequences (the first ones of the val split, the same for every run).
        save_interval: checkpoint every this many steps (and at the end); 0 = only at the end.
        seed: model init and data order.
        ep_size: expert-parallel size; divides the world size and num_experts.
        save_dir: where checkpoints and metrics.jsonl go; if it holds a checkpoint, training
            resumes from it.
        load_dir: checkpoint to start from when save_dir has none.
        exit_at: stop after this global step, evaluating and saving a checkpoint, before the stage
            ends; the command without it (or with a later step) then resumes the stage (a
            preemptible job, or a stage that changes a setting part-way, e.g.
            `--set route_groups=none`).
    """

    steps: int
    split: str = "pretrain"
    warmup_steps: int | None = None
    decay_fraction: float = 0.1
    min_lr_ratio: float = 0.0
    fresh_schedule: bool = False
    keep_data_position: bool = False
    eval_interval: int = 50
    eval_samples: int = 256
    save_interval: int = 0
    seed: int = 0
    ep_size: int = 1
    save_dir: str | None = None
    load_dir: str | None = None
    exit_at: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.split not in SPLITS or self.split == "val":
            raise UserError(f"--split must be pretrain or cpt, got {self.split!r}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("--decay-fraction and --min-lr-ratio must be within [0, 1]")
        if self.ep_size < 1:
            raise UserError(f"--ep-size must be >= 1, got {self.ep_size}")
        if self.fresh_schedule and not self.load_dir:
            raise UserError("--fresh-schedule needs --load")
        if self.keep_data_position and not self.fresh_schedule:
            raise UserError("--keep-data-position applies to a new stage: give --fresh-schedule too "
                            "(a resumed run always keeps its data position)")
        if self.exit_at is not None and (self.exit_at < 1 or not self.save_dir):
            raise UserError("--exit-at needs a step >= 1 and --save (the run resumes from what it saves)")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)
