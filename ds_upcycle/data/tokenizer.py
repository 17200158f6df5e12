"""SentencePiece tokenizer: trained on the pre-training split, or loaded from a model file."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from ..errors import UserError

EOS_ID = 2
# Part of the cache key of trained tokenizers: change it when the training settings change.
TRAINING_SETTINGS = "bpe-bytefallback-identity-v2"
MAX_LINE = 4000  # SentencePiece skips longer input lines (its default limit is 4192 bytes)


def _lines(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        for line in doc.splitlines():
            line = line.strip()
            for start in range(0, len(line), MAX_LINE):
                yield line[start:start + MAX_LINE]


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_path: Path) -> Path:
    """Train a BPE model with byte fallback (any text encodes) and write `model_path`."""
    # Written through model_writer so the model holds no file paths: same text, same bytes.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(documents), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        # Keep text as written: newlines (as byte pieces) and runs of spaces survive a round trip,
        # so generation stop strings such as "\n\n" and few-shot separators still match.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=EOS_ID, pad_id=-1, hard_vocab_limit=False,
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=2, minloglevel=2)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    return model_path


def load_tokenizer(model_path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"tokenizer model not found: {path}")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise UserError(f"not a SentencePiece model: {path} ({err})") from None


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
