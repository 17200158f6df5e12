"""The warm-start jump of an expansion: validation loss of the source and the expanded model.

Both models are measured on the same batches: the first `samples` sequences of the `val` split of
the data the source was trained on (its ds_upcycle.json `data` settings), tokenized with the
checkpoint's own tokenizer.model. Each model is rebuilt in one process on the CPU in eval mode
(evaluation.weights.load_checkpoint, whatever layout wrote it) and scored with the mean
next-token cross-entropy of training/loop.py `validation_loss`: summed over every target token of
every sequence, divided by the number of target tokens.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import DataConfig, PackedSequences, prepare_data, validation_batches
from ..errors import UserError
from ..training.checkpoint import RUN_FILE, find_checkpoint

BATCH_SIZE = 8  # sequences per forward pass; the sum over tokens does not depend on it


@dataclass(frozen=True)
class WarmStart:
    source_loss: float
    expanded_loss: float
    samples: int

    @property
    def jump(self) -> float:
        return self.expanded_loss - self.source_loss

    def describe(self) -> str:
        return (f"validation loss {self.source_loss:.3f} -> {self.expanded_loss:.3f} ({self.jump:+.3f}) "
                f"on {self.samples} sequences")

    def to_dict(self) -> dict:
        return {"source_loss": self.source_loss, "expanded_loss": self.expanded_loss,
                "jump": self.jump, "samples": self.samples, "split": "val"}


def source_data_config(source_path, data_cache: str | None = None) -> tuple[DataConfig, Path]:
    """The data settings the source was trained with, and its tokenizer; UserError if it has none.

    Cheap (reads two small files): expand calls it before writing anything.
    """
    ref = find_checkpoint(source_path)
    if not (ref.path / RUN_FILE).is_file():
        raise UserError(f"validation loss needs the training data settings in {ref.path / RUN_FILE}, "
                        f"which this checkpoint lacks (not written by train.py)")
    data = ref.run_info.get("data")
    if not isinstance(data, dict) or "source" not in data or "seq_len" not in data:
        raise UserError(f"{ref.path / RUN_FILE} records no data settings (source, seq_len) for a validation loss")
    if ref.tokenizer is None:
        raise UserError(f"{ref.path} has no tokenizer.model to tokenize the validation data with")
    known = {f.name for f in fields(DataConfig)}
    settings = {k: v for k, v in data.items() if k in known and k not in ("cache_dir", "tokenizer")}
    return DataConfig(**settings, cache_dir=data_cache), ref.tokenizer


def validation_data(source_path, data_cache: str | None = None, split: str = "val") -> PackedSequences:
    """A split (default `val`) of the checkpoint's training data, tokenized with its own tokenizer."""
    cfg, tokenizer = source_data_config(source_path, data_cache)
    prepared = prepare_data(cfg, tokenizer)
    return PackedSequences(prepared.tokens(split), cfg.seq_len, split)


@torch.no_grad()
def model_loss(model: torch.nn.Module, data: PackedSequences, samples: int, batch_size: int = BATCH_SIZE) -> float:
    """Mean next-token cross-entropy over the first `samples` sequences (as validation_loss, 1 process)."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs_BT, targets_BT in validation_batches(data, samples, batch_size, 1, 0):
        logits_BTV, _ = model(inputs_BT.to(device))
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.to(device).flatten(), reduction="sum")
        totals += torch.tensor([loss.item(), targets_BT.numel()], dtype=torch.float64)
    return (totals[0] / totals[1]).item()


def checkpoint_loss(path, data: PackedSequences, samples: int) -> float:
    from ..evaluation.weights import load_checkpoint

    loaded = load_checkpoint(path, "cpu", torch.float32)
    vocab = loaded.model.cfg.vocab_size
    used = data.tokens[:samples * data.seq_len + 1]  # the windows scored below
    if int(used.max()) >= vocab:
        raise UserError(f"--check-data: the validation tokens exceed {path}'s vocabulary of {vocab}")
    try:
        return model_loss(loaded.model, data, samples)
    finally:
        del loaded
        gc.collect()


def warm_start(source_path, expanded_path, samples: int = 64, data_cache: str | None = None,
               data: PackedSequences | None = None) -> WarmStart:
    """Validation loss of the source and of the expanded checkpoint on the same sequences.

    `data` (from validation_data(source_path)) skips preparing the data again.
    """
    if samples < 1:
        raise UserError(f"--check-samples must be >= 1, got {samples}")
    data = data if data is not None else validation_data(source_path, data_cache)
    count = min(samples, data.num_samples)
    source_loss = checkpoint_loss(source_path, data, count)  # one model in memory at a time
    expanded_loss = checkpoint_loss(expanded_path, data, count)
    return WarmStart(source_loss, expanded_loss, count)
