"""The data a checkpoint was trained on, as its run record describes it, prepared once per command.

A command that needs a checkpoint's data (a validation loss, calibration batches, a warm-start
check) builds one RunData and passes it on; the settings are checked when it is built (cheap: two
small files) and the data is tokenized, with the checkpoint's own tokenizer, only when first read.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import numpy as np

from ..checkpoint import RUN_FILE, CheckpointRef, find_checkpoint
from ..data.config import DataConfig
from ..data.loader import PackedSequences
from ..data.prepare import PreparedData, prepare_data
from ..errors import UserError


class RunData:
    """Data settings, tokenizer and splits of a ds-upcycle checkpoint."""

    def __init__(self, checkpoint: str | os.PathLike | CheckpointRef, cache_dir: str | None = None) -> None:
        self.ref = checkpoint if isinstance(checkpoint, CheckpointRef) else find_checkpoint(checkpoint)
        if not self.ref.has_run_record:
            raise UserError(f"{self.ref.path} has no {RUN_FILE}: its training data settings are unknown "
                            f"(not written by train.py)")
        record = self.ref.run_record
        # An imported model records its context length but has no training data of its own.
        self.imported_from = record.imported_from.architecture if record.imported_from else None
        if record.data is None and (record.context is None or not self.imported_from):
            raise UserError(f"{self.ref.path / RUN_FILE} records no data settings (source, seq_len)")
        self.has_source = record.data is not None
        if self.ref.tokenizer is None:
            raise UserError(f"{self.ref.path} has no tokenizer to turn its text into token ids")
        settings = record.data if record.data is not None else DataConfig(seq_len=record.context)
        self.config = replace(settings, tokenizer=None, cache_dir=cache_dir)
        self.tokenizer: Path = self.ref.tokenizer
        self.vocab_size = record.model.vocab_size
        self._splits: dict[str, PackedSequences] = {}

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def text_field(self) -> str:
        return self.config.text_field

    def check_has_source(self) -> None:
        """Refuse, before any work, a use of the run's own data where it has none (an import)."""
        if not self.has_source:
            raise UserError(f"{self.ref.path} was imported from a transformers model ({self.imported_from}) and has "
                            f"no training data of its own; name the data to use instead")

    @cached_property
    def prepared(self) -> PreparedData:
        self.check_has_source()
        return prepare_data(self.config, self.tokenizer)

    def tokens(self, split: str) -> np.ndarray:
        return self.prepared.tokens(split)

    def split(self, name: str = "val") -> PackedSequences:
        """A split (pretrain, cpt or val) as packed sequences of the training sequence length."""
        if name not in self._splits:
            self._splits[name] = PackedSequences(self.tokens(name), self.seq_len, name)
        return self._splits[name]
