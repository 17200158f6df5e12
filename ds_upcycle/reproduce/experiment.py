"""One reproduction being run: built once per command and handed to every step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import ReproduceConfig


@dataclass(frozen=True)
class Experiment:
    """The config, the experiment directory, the prepared-data cache and where progress lines go."""

    cfg: ReproduceConfig
    out: Path
    data_cache: str | None = None
    say: Callable[[str], None] = print
