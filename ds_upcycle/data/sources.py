"""Where training text comes from: the built-in synthetic corpus, local files, or a hub dataset.

Documents are the unit of splitting. A .txt file is one document; each row of a .jsonl/.json or
.parquet file (its `text_field`) is one document; so is each row of a hub dataset's train split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import UserError
from .synthetic import SyntheticSpec, generate_documents

FILE_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextSource:
    """A re-iterable collection of documents plus an identity string for caching."""

    description: str
    identity: str
    documents: Callable[[], Iterable[str]]


def _synthetic(spec_text: str) -> TextSource:
    try:
        spec = SyntheticSpec.parse(spec_text)
    except (ValueError, TypeError) as err:
        raise UserError(f"bad synthetic data spec {spec_text!r}: {err}") from None
    return TextSource(f"built-in synthetic corpus ({spec.docs} documents, seed {spec.seed})",
                      f"synthetic:{spec!r}", lambda: generate_documents(spec))


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS)
        if not files:
            raise UserError(f"no .txt, .jsonl, .json or .parquet files under {path}")
    else:
        if path.suffix not in FILE_FORMATS:
            raise UserError(f"unsupported data file {path}: use .txt, .jsonl, .json or .parquet")
        files = [path]
    kinds = {FILE_FORMATS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes file formats ({', '.join(sorted(kinds))}); use one kind of file")
    return files


def _files(path: Path, text_field: str) -> TextSource:
    files = _local_files(path)
    kind = FILE_FORMATS[files[0].suffix]
    stat = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    identity = "files:" + hashlib.sha256(json.dumps([stat, text_field]).encode()).hexdigest()

    def documents() -> Iterable[str]:
        import datasets

        if kind == "text":  # one row per file
            data = datasets.load_dataset("text", data_files=[str(p) for p in files], sample_by="document",
                                         split="train")
            yield from data["text"]
            return
        data = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
        if text_field not in data.column_names:
            raise UserError(f"{path}: no field {text_field!r} (fields: {', '.join(data.column_names)}); "
                            f"pass --text-field")
        yield from data[text_field]

    return TextSource(f"{len(files)} {kind} file(s) under {path}", identity, documents)


def _hub(name: str, text_field: str) -> TextSource:
    def documents() -> Iterable[str]:
        import datasets

        try:
            data = datasets.load_dataset(name, split="train")
        except Exception as err:  # the hub client raises many types; all mean "not available"
            raise UserError(f"cannot load dataset {name!r} (not a local path, and the hub gave: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if text_field not in data.column_names:
            raise UserError(f"dataset {name!r} has no field {text_field!r}; pass --text-field")
        yield from data[text_field]

    return TextSource(f"hub dataset {name}", f"hub:{name}:{text_field}", documents)


def resolve_source(spec: str, text_field: str = "text") -> TextSource:
    """'synthetic[:opts]', a local file or directory, or a hub dataset name ('user/name')."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic(spec)
    path = Path(os.path.expanduser(spec))
    if path.exists():
        return _files(path, text_field)
    looks_like_path = path.suffix in FILE_FORMATS or spec.startswith((".", "/", "~")) or os.sep + os.sep in spec
    if looks_like_path or spec.count("/") > 1:
        raise UserError(f"data file not found: {spec}")
    return _hub(spec, text_field)
