"""Tokenizers: SentencePiece (trained on the pre-training split, or loaded from a model file) or a
Hugging Face tokenizer.json (what released models ship), behind one small interface."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import tokenizers

from ..errors import UserError

EOS_ID = 2  # of the SentencePiece models ds-upcycle trains
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
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


class Tokenizer:
    """Text to token ids and back; `path` is the file the ids refer to (what a checkpoint stores)."""

    path: Path
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def files(self) -> list[Path]:
        """The files that make this tokenizer, to copy beside a checkpoint."""
        return tokenizer_files(self.path)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path) -> None:
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise UserError(f"not a SentencePiece model: {path} ({err})") from None
        self.path, self.eos_id, self.vocab_size = path, self.sp.eos_id(), self.sp.get_piece_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (tokenizer.json), EOS named by the tokenizer_config.json beside it.

    Text is encoded without the special tokens a post-processor would add: ds-upcycle separates
    documents by EOS itself, as it does with SentencePiece.
    """

    def __init__(self, path: Path) -> None:
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises its own exception types
            raise UserError(f"not a Hugging Face tokenizer.json: {path} ({err})") from None
        self.path, self.vocab_size = path, self.tok.get_vocab_size(with_added_tokens=True)
        eos = configured_token(path.parent / HF_CONFIG, "eos_token")
        eos_id = None if eos is None else self.tok.token_to_id(eos)
        if eos_id is None:
            raise UserError(f"{path.parent / HF_CONFIG} names no eos_token of {path} (needed to separate documents)")
        self.eos_id = eos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def configured_token(config: Path, key: str) -> str | None:
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get(key)
    except json.JSONDecodeError as err:
        raise UserError(f"{config} is not valid JSON: {err}") from None
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file a path names: a SentencePiece model, a tokenizer.json, or a directory
    holding one (tokenizer.json first: it is what transformers itself loads)."""
    path = Path(path)
    if path.is_dir():
        for name in (HF_FILE, SP_FILE):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} holds no tokenizer ({HF_FILE} or a SentencePiece {SP_FILE})")
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    return path


def find_tokenizer(directory: Path) -> Path | None:
    """The tokenizer stored in a checkpoint's tag directory, if any."""
    for name in (SP_FILE, HF_FILE):
        if (directory / name).is_file():
            return directory / name
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = tokenizer_file(path)
    return HFTokenizer(file) if file.suffix == ".json" else SentencePieceTokenizer(file)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files that make a tokenizer (read by name only, not parsed): the file itself, and for a
    tokenizer.json the tokenizer_config.json beside it, if any."""
    file = tokenizer_file(path)
    config = file.parent / HF_CONFIG
    return [file, config] if file.suffix == ".json" and config.is_file() else [file]


def copy_tokenizer(path: str | Path, directory: Path) -> Path:
    """Copy a tokenizer's files into `directory` under the names find_tokenizer looks for."""
    files = tokenizer_files(path)
    main = directory / (HF_FILE if files[0].suffix == ".json" else SP_FILE)
    shutil.copyfile(files[0], main)
    for file in files[1:]:
        shutil.copyfile(file, directory / file.name)
    return main


def tokenizer_digest(path: str | Path) -> str:
    """Identity of a tokenizer: the hash of all its files (for HF, EOS comes from the config)."""
    digest = hashlib.sha256()
    for file in tokenizer_files(path):
        digest.update(file.read_bytes())
    return digest.hexdigest()
