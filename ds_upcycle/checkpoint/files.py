"""Loading checkpoint files safely, with errors a user can act on, and writing large files in place.

torch.load with weights_only=False runs whatever a pickle asks for, so a checkpoint file from
elsewhere could run code on the machine that reads it. Every file is therefore read with
weights_only=True and an allowlist of the few classes DeepSpeed's own checkpoints hold
(`DEEPSPEED_GLOBALS`), after a scan that names any other global before anything is unpickled.
Users who vouch for a checkpoint that holds other classes opt in (trust.py), which loads it as
DeepSpeed itself would.
"""

from __future__ import annotations

import mmap
import pickle
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler, LossScalerBase
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from ..errors import UserError
from ..trust import TRUST_ENV, trusting

# What DeepSpeed 0.19's save paths pickle besides tensors and plain containers: the ZeRO stage, the
# loss scaler and the parameter-to-partition map of the ZeRO and bf16 optimizer files. Added to
# torch's allowlist once for the process: torch's `safe_globals` context swaps one process-wide list,
# so two threads reading checkpoints (reproduce runs seeds in threads) would clear it for each other.
DEEPSPEED_GLOBALS = (ZeroStageEnum, fragment_address, LossScalerBase, LossScaler, DynamicLossScaler)
torch.serialization.add_safe_globals(list(DEEPSPEED_GLOBALS))


def check_globals(path: Path) -> None:
    """Refuse a file whose pickle names a global outside torch's and DeepSpeed's allowlists, before
    anything in it is unpickled (a static scan of the pickle's opcodes)."""
    if trusting():
        return
    try:
        unknown = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as err:  # not a torch.save zip archive, or a damaged one
        raise UserError(f"cannot read {path}: truncated or corrupt file ({type(err).__name__}: {_first_line(err)})") \
            from None
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise UserError(f"{path} would import {unknown[0]}{more}, which DeepSpeed checkpoints do not hold; refused "
                        f"(unpickling it could run code). If you trust this checkpoint, pass --trust-checkpoints "
                        f"or set {TRUST_ENV}=1")


def check_checkpoint_dir(tag_dir: Path) -> None:
    """check_globals for every .pt file of a checkpoint (before DeepSpeed unpickles them itself)."""
    for path in sorted(Path(tag_dir).glob("*.pt")):
        check_globals(path)


def _torch_load(path: Path, mmap: bool) -> dict:
    return torch.load(path, map_location="cpu", weights_only=not trusting(), mmap=mmap)


def load_file(path: Path, mmap: bool = False) -> dict:
    """torch.load a DeepSpeed checkpoint file on CPU, safely (see the module's docstring).

    With mmap, tensors stay on disk until read, which bounds memory when only a few parameters
    of a large file are needed.
    """
    if not path.is_file():
        raise UserError(f"missing checkpoint file: {path}")
    check_globals(path)
    try:
        return _torch_load(path, mmap)
    except pickle.UnpicklingError as err:  # what the scan cannot see: a global built while unpickling
        raise UserError(f"{path}: refused by torch's safe loader ({_first_line(err)}); if you trust this checkpoint, "
                        f"pass --trust-checkpoints or set {TRUST_ENV}=1") from None
    except Exception as err:  # torch raises assorted types for truncated or corrupt archives
        raise UserError(f"cannot read {path}: truncated or corrupt file ({type(err).__name__}: {_first_line(err)})") \
            from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


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
    check_globals(path)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        obj = _torch_load(path, mmap=True)
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
