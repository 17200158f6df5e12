"""Data: text sources, tokenizers (SentencePiece or Hugging Face), cached token files and packed batches."""

from .loader import BatchOrder, PackedSequences, validation_batches
from .prepare import SPLITS, DataConfig, PreparedData, prepare_data

__all__ = ["SPLITS", "BatchOrder", "DataConfig", "PackedSequences", "PreparedData", "prepare_data",
           "validation_batches"]
