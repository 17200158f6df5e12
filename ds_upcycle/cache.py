"""Where ds-upcycle keeps what it can rebuild: prepared data, and DeepSpeed's compiled ops."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """$DS_UPCYCLE_CACHE, or ~/.cache/ds_upcycle."""
    return Path(os.environ.get("DS_UPCYCLE_CACHE", Path.home() / ".cache" / "ds_upcycle"))


def extensions_dir() -> Path:
    """A folder for the ops DeepSpeed compiles on first use, one per Python environment.

    torch keeps one extension cache per user, but a build there names its environment's own source
    paths: two virtual environments used in turn (a newcomer's and CI's, say) rebuild DeepSpeed's
    CPU communication op, about a minute, at every launch that follows the other's. Keyed by the
    environment (sys.prefix), each builds once."""
    digest = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return cache_root() / "torch_extensions" / f"{Path(sys.prefix).name}-{digest}"
