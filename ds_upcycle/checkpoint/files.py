"""Loading checkpoint files with errors a user can act on, and writing a directory atomically."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch

from ..errors import UserError


def load_file(path: Path, mmap: bool = False) -> dict:
    """torch.load a DeepSpeed checkpoint file on CPU.

    DeepSpeed pickles non-tensor objects (loss scaler, enums, fragment addresses), so this needs
    weights_only=False: only open checkpoints you trust. With mmap, tensors stay on disk until read,
    which bounds memory when only a few parameters of a large file are needed.
    """
    if not path.is_file():
        raise UserError(f"missing checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # torch raises assorted types for truncated or corrupt archives
        detail = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {path}: truncated or corrupt file ({type(err).__name__}: {detail})") from None


def save_file(obj: dict, path: Path) -> None:
    torch.save(obj, path)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary directory next to `final`, renamed to `final` only if the block completes."""
    if final.exists():
        raise UserError(f"output already exists: {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
