"""Tensors parked in scratch files beside an output and mapped back, so memory holds none of them.

A checkpoint's model file is one `torch.save` of every non-expert weight: all of them must exist as
tensors when it is written. Held in memory, they grow with the model's depth (a 235B release has
tens of GB of them); parked in files and mapped back (`torch.from_file`, private mapping), their
pages belong to the page cache, which the kernel reads in and drops as `torch.save` walks them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


class ScratchFiles:
    """`park(tensor)` -> an equal tensor backed by a file of the scratch folder beside `beside`
    (a dot-folder, removed on exit, whatever happens)."""

    def __init__(self, beside: Path) -> None:
        self.beside = Path(beside)
        self.folder: Path | None = None
        self.count = 0

    def __enter__(self) -> ScratchFiles:
        self.beside.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.beside.name}.", suffix=".scratch",
                                            dir=self.beside.parent))
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def park(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.folder is None:
            raise RuntimeError("ScratchFiles.park outside its `with` block")
        if not tensor.numel():
            return tensor.clone()
        path = self.folder / f"{self.count}.bin"
        self.count += 1
        flat = tensor.detach().contiguous().reshape(-1)
        flat.view(torch.uint8).numpy().tofile(path)  # bytes as they are: bf16 has no numpy type
        mapped = torch.from_file(str(path), shared=False, size=flat.numel(), dtype=flat.dtype)
        return mapped.reshape(tensor.shape)
