"""The floating-point types a model may be loaded and evaluated in, by the names users type."""

from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What `ds-upcycle export` writes: the precisions a checkpoint trains in.
EXPORT_DTYPES = ("float32", "bfloat16")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]
