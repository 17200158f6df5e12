"""Files and directories that appear whole or not at all: written beside their final name, then renamed over it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UserError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def check_destination(dst: Path, force: bool) -> None:
    """An output directory may be new or empty; a full one only with --force (replaced when done)."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"destination {dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise UserError(f"destination {dst} is not empty; pass --force to replace it")


def swap_into_place(new: Path, dst: Path) -> None:
    """Rename the finished output to dst; an existing dst (only with --force) goes only after that."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        new.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
    dst.rename(old)
    new.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
