"""Files and directories that appear whole or not at all: written beside their final name, then renamed over it.

One rule for directories (`staged_dir`): the output is built in `.NAME.<random>.partial` beside
NAME and renamed to NAME when complete; whenever the block does not complete (an error, an
interrupt) the staging folder is removed, so a failed command leaves nothing behind and a source
is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

EXISTING = ("refuse", "replace", "keep")  # what staged_dir does with an output that is already there


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


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, in one line, an output `path` (file or directory) that could not be created.

    Outputs are written beside their final name and renamed over it, so what must be writable is
    the folder that will hold `path`: its nearest existing ancestor must be a directory in which a
    folder can be made. Tried for real (a folder made and removed at once), because permission bits
    do not tell a read-only file system, nor anything to a root user."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {what} {path}: {ancestor} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ds-upcycle-write-check.", dir=ancestor))
    except OSError as err:
        raise UserError(f"cannot write {what} {path}: {ancestor} is not writable ({err.strerror})") from None


def check_destination(dst: Path, force: bool) -> None:
    """An output directory may be new or empty; a full one only with --force (replaced when done).
    Its folder must be writable.

    Commands call this before their work, so that a refusal costs nothing; staged_dir checks again."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"destination {dst} exists and is not a directory")
    if _occupied(dst) and not force:
        raise UserError(f"destination {dst} is not empty; pass --force to replace it")
    check_writable(dst, "destination")


@contextmanager
def staged_dir(dst: str | os.PathLike, existing: str = "refuse") -> Iterator[Path]:
    """A new empty directory beside `dst`, renamed to `dst` when the block completes, removed otherwise.

    `existing` says what happens to a `dst` that is already there (an empty directory counts as
    absent): "refuse" (UserError, before the block runs), "replace" (--force: the old one is removed
    only once the new one is in place) or "keep" (a content-addressed cache: another process
    published the same content first, and the new copy is dropped).
    """
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {EXISTING}, got {existing!r}")
    dst = Path(dst)
    if existing == "refuse" and _occupied(dst):
        raise UserError(f"output already exists: {dst}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    except OSError as err:
        raise UserError(f"cannot write {dst}: {err.strerror} ({err.filename})") from None
    try:
        yield tmp
        if existing == "keep":
            try:
                tmp.rename(dst)
            except OSError:  # another process published first
                if not _occupied(dst):
                    raise
            return
        if existing == "refuse" and _occupied(dst):
            raise UserError(f"output already exists: {dst} (written by another process meanwhile)")
        _swap_into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _swap_into_place(new: Path, dst: Path) -> None:
    """Rename the finished output to dst; an existing dst goes only after that."""
    if not dst.exists():
        new.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
    dst.rename(old)
    new.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
