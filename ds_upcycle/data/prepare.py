"""Turn a text source into tokenized, split token files (cached, written atomically).

Layout of a prepared data directory:
    tokenizer.model or .json       the tokenizer the tokens were made with (SentencePiece or Hugging Face)
    pretrain.bin, cpt.bin, val.bin documents of that split, each followed by EOS, as uint16/uint32
    meta.json                      source, split fractions, token and document counts

Each document goes to exactly one split, chosen by a hash of its text (salted by `split_seed`):
the splits are disjoint, deterministic, and independent of document order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import staged_dir
from ..cache import cache_root
from ..choices import SPLITS
from ..errors import UserError
from .config import DataConfig
from .sources import TextSource, resolve_source
from .tokenizer import (TRAINING_SETTINGS, Tokenizer, copy_tokenizer, find_tokenizer, load_tokenizer, tokenizer_digest,
                        tokenizer_file, train_tokenizer)

def split_of(text: str, val_fraction: float, cpt_fraction: float, seed: int) -> str:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, salt=seed.to_bytes(8, "little"))
    u = int.from_bytes(digest.digest(), "little") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + cpt_fraction:
        return "cpt"
    return "pretrain"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreparedData:
    path: Path

    @property
    def tokenizer_path(self) -> Path:
        return find_tokenizer(self.path)

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r")


def _pretrain_documents(source: TextSource, cfg: DataConfig):
    for doc in source.documents():
        if split_of(doc, cfg.val_fraction, cfg.cpt_fraction, cfg.split_seed) == "pretrain":
            yield doc


def _trained_tokenizer(source: TextSource, cfg: DataConfig, cache: Path) -> Path:
    final = cache / f"tokenizer-{_key(source.identity, cfg.split_params(), cfg.vocab_size, TRAINING_SETTINGS)}"
    if not (final / "tokenizer.model").is_file():
        # Cache entries are named by their content: one published meanwhile by another process is kept.
        with staged_dir(final, "keep") as tmp:
            train_tokenizer(_pretrain_documents(source, cfg), cfg.vocab_size, tmp / "tokenizer.model")
    return final / "tokenizer.model"


def _tokenize(source: TextSource, cfg: DataConfig, tokenizer: Tokenizer, out: Path) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    files = {split: open(out / f"{split}.bin", "wb") for split in SPLITS}
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        ids = tokenizer.encode_batch([doc for _, doc in batch])
        for (split, _), doc_ids in zip(batch, ids):
            arr = np.asarray(doc_ids + [tokenizer.eos_id], dtype=dtype)
            files[split].write(arr.tobytes())
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(arr)
        batch.clear()

    try:
        for doc in source.documents():
            if doc.strip():
                batch.append((split_of(doc, cfg.val_fraction, cfg.cpt_fraction, cfg.split_seed), doc))
            if len(batch) >= 512:
                flush()
        flush()
    finally:
        for f in files.values():
            f.close()
    return {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "splits": counts}


def prepare_data(cfg: DataConfig, tokenizer: str | Path | None = None) -> PreparedData:
    """Prepare (or find in the cache) the token files of `cfg.source`.

    The tokenizer is, in order: the `tokenizer` argument (e.g. the one stored in a checkpoint),
    `cfg.tokenizer`, or one trained on the pre-training split.
    """
    cache = Path(cfg.cache_dir) if cfg.cache_dir else cache_root()
    source = resolve_source(cfg.source, cfg.text_field)
    tokenizer_path = tokenizer_file(tokenizer or cfg.tokenizer or _trained_tokenizer(source, cfg, cache))
    load_tokenizer(tokenizer_path)  # fail early on a bad file
    final = cache / f"data-{_key(source.identity, cfg.split_params(), tokenizer_digest(tokenizer_path))}"
    if not (final / "meta.json").is_file():
        with staged_dir(final, "keep") as tmp:
            meta = _tokenize(source, cfg, load_tokenizer(copy_tokenizer(tokenizer_path, tmp)), tmp)
            meta.update(source=source.description, split_params=cfg.split_params(),
                        data_config=asdict(cfg))
            empty = [s for s in SPLITS if meta["splits"][s]["tokens"] == 0]
            if empty:
                total = sum(meta["splits"][s]["documents"] for s in SPLITS)
                raise UserError(f"split(s) {', '.join(empty)} of {source.description} are empty "
                                f"({total} documents in all): give more documents (each .txt file is one)")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return PreparedData(final)
