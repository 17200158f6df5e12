"""Where ds-upcycle keeps what it can rebuild: prepared data, and DeepSpeed's compiled ops."""

from __future__ import annotations

import hashlib
import os
import sys
import time
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


# A build of DeepSpeed's CPU op takes about a minute, and torch holds its lock only while it builds
# or checks the build: a lock this old was left by a process killed in between.
STALE_BUILD_LOCK_S = 600


def clear_stale_build_lock(op_dir: Path, now: float | None = None) -> bool:
    """Remove `op_dir`/lock when it is older than STALE_BUILD_LOCK_S; returns whether it did.

    torch waits, silently and for ever, while an op's build folder holds a lock file, and a process
    killed while building (or checking) the op leaves the file behind: every later launch would hang."""
    lock = op_dir / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_BUILD_LOCK_S:
        return False
    lock.unlink(missing_ok=True)
    return True
