"""The floating-point types a model may be loaded and evaluated in, by the names users type."""

from __future__ import annotations

import torch

from .choices import DTYPE_NAMES
from .errors import UserError

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]
