"""Where training text comes from and how it is split: the data settings, checked when made.

Kept apart from the preparing code so that the command line builds its options without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is split and tokenized.

    Attributes:
        source: "synthetic[:docs=N,seed=S]", a local .txt/.jsonl/.json/.parquet file or directory,
            or a hub dataset name.
        text_field: field holding the text in .jsonl/.parquet rows and hub datasets.
        seq_len: tokens per training sequence.
        vocab_size: size of the tokenizer trained when none is given.
        tokenizer: an existing tokenizer to use instead of training one (a SentencePiece .model,
            a Hugging Face tokenizer.json, or a directory holding one).
        val_fraction, cpt_fraction: share of documents in the validation and continued
            pre-training splits; the rest is pre-training (a data share: reproduce's cpt_fraction
            is a share of steps).
        split_seed: salt of the document hash that assigns splits.
        cache_dir: where prepared data is kept (default $DS_UPCYCLE_CACHE or ~/.cache/ds_upcycle).
    """

    source: str = "synthetic"
    text_field: str = "text"
    seq_len: int = 128
    vocab_size: int = 2048
    tokenizer: str | None = None
    val_fraction: float = 0.05
    cpt_fraction: float = 0.35
    split_seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.vocab_size < 300:
            raise UserError(f"vocab_size must be >= 300 (byte fallback needs 259 ids), got {self.vocab_size}")
        fractions = (self.val_fraction, self.cpt_fraction)
        if min(fractions) <= 0 or sum(fractions) >= 1:
            raise UserError("val_fraction and cpt_fraction must be positive and sum to less than 1")

    def split_params(self) -> dict:
        return {"val": self.val_fraction, "cpt": self.cpt_fraction, "seed": self.split_seed}
