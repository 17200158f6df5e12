"""Utility scores from exact gradients on calibration batches in one CPU process (small models).

The model is the source rebuilt in fp32 from the checkpoint's fp32 master weights
(trained.load_master_model); the statistics are trained.gradients' over the first batches of the
calibration data. The same checkpoint, data and settings give bit-identical scores on the same
machine and thread count. On a real model the scores belong on the training hardware:
`train.py --score-experts` computes the same statistics on the DeepSpeed engine and writes them to
a file that `expand --scores` reads.
"""

from __future__ import annotations

import gc
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import CheckpointReader
from ..trained import RunData, load_master_model
from ..trained.calibration_data import calibration_data
from ..trained.gradients import expert_gradient_stats
from ..trained.scores import ExpertScores, scored_checkpoint


def calibrate(source: CheckpointReader, run: RunData, spec: str, num_batches: int, batch_size: int) -> ExpertScores:
    """Scores of every expert of a checkpoint over the first batches of `spec`."""
    data = calibration_data(run, spec, num_batches * batch_size)
    batches = data.batches(batch_size)
    model = load_master_model(source)
    try:
        # A forward and backward pass of the whole model per batch: minutes for a large one.
        stats = expert_gradient_stats(model, tqdm([[batch] for batch in batches], desc="calibration", unit="batch",
                                                  leave=False, dynamic_ncols=True))
        checkpoint = scored_checkpoint(Path(source.path).name, source.meta.global_steps)
        info = {"from": "calibration data", "data": spec, "description": data.description,
                "batches": len(batches), "batch_size": batch_size, "sequences": int(data.windows.shape[0]),
                "seq_len": int(data.windows.shape[1] - 1)}
        return ExpertScores.from_stats(stats, checkpoint, info)
    finally:
        del model
        gc.collect()
