"""Loading checkpoint files with errors a user can act on, and writing large files in place."""

from __future__ import annotations

import mmap
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch

from ..errors import UserError


def load_file(path: Path, mmap: bool = False, weights_only: bool = False) -> dict:
    """torch.load a DeepSpeed checkpoint file on CPU.

    Optimizer and model-state files pickle non-tensor objects (loss scaler, enums, fragment
    addresses), so reading them whole needs weights_only=False: only open checkpoints you trust.
    Per-expert weight files hold tensors only and are read with weights_only=True. With mmap,
    tensors stay on disk until read, which bounds memory when only a few parameters of a large
    file are needed.
    """
    if not path.is_file():
        raise UserError(f"missing checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:  # torch raises assorted types for truncated or corrupt archives
        detail = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {path}: truncated or corrupt file ({type(err).__name__}: {detail})") from None


def save_file(obj: dict, path: Path) -> None:
    torch.save(obj, path)


def save_skeleton(obj: dict, path: Path, holes: list[torch.Tensor]) -> None:
    """torch.save `obj` without the bytes of the tensors in `holes`, which stay zero in the file.

    The hole tensors may be uninitialised (`torch.empty`): they are never read, so a file of
    gigabytes costs no memory here. Fill them afterwards through `open_for_filling`.
    """
    hole_ids = {id(t) for t in holes}
    with torch.serialization.skip_data():
        torch.save(obj, path)
    # skip_data leaves every tensor's bytes out; write back those that are not holes (step
    # counters and the like), which are small.
    with open_for_filling(path) as saved:
        for original, mapped in zip(_tensors(obj), _tensors(saved), strict=True):
            if original.shape != mapped.shape:
                raise RuntimeError(f"{path}: a saved tensor came back with another shape")
            if id(original) not in hole_ids:
                mapped.copy_(original)


@contextmanager
def open_for_filling(path: Path) -> Iterator[dict]:
    """Load a file's tensors mapped shared: what is written into them lands in the file.

    Writes go to the page cache, not to anonymous memory, so filling a large file in pieces holds
    only the piece being copied.
    """
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    try:
        yield obj
    finally:
        del obj  # unmaps the file once the caller's references are gone


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Tensors of a nested checkpoint structure in a fixed order (dicts in insertion order)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _tensors(vars(obj))
