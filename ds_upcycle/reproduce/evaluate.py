"""Final evaluation of an arm: a results file that `ds-upcycle compare` reads.

With tasks, `ds-upcycle eval` itself runs (lm-eval plus the validation loss). Without tasks only the
validation loss is measured, the same way (first N sequences of the checkpoint's own val split),
and written in the same `ds_upcycle` summary shape, so both kinds of results compare alike.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_json_atomic
from ..checkpoint import find_checkpoint
from ..evaluation.run import EvalConfig, checkpoint_summary, run_eval
from ..trained import RunData, checkpoint_loss
from .experiment import Experiment


def _loss_only(exp: Experiment, checkpoint: Path) -> dict:
    cfg = exp.cfg
    ref = find_checkpoint(checkpoint)
    data = RunData(ref, exp.data_cache).split("val")
    count = min(cfg.final_val_samples, data.num_samples)
    return {"ds_upcycle": {**checkpoint_summary(ref, {}, checkpoint_loss(ref.path, data, count)),
                           "val_loss_measured_on": {"split": "val", "sequences": count}}}


def evaluate_arm(exp: Experiment, checkpoint: Path, output: Path) -> Path:
    """Evaluate the checkpoint in save dir `checkpoint`; results go to `output` (written atomically)."""
    cfg = exp.cfg
    output.parent.mkdir(parents=True, exist_ok=True)
    if cfg.tasks:
        run_eval(EvalConfig(checkpoint=str(checkpoint), tasks=cfg.tasks, limit=cfg.task_limit,
                            batch_size=cfg.eval_batch_size, device=cfg.eval_device, dtype=cfg.eval_dtype,
                            offline=True, output=str(output), seed=cfg.seed, val_samples=cfg.final_val_samples,
                            data_cache=exp.data_cache))
        return output
    return write_json_atomic(output, _loss_only(exp, checkpoint))
