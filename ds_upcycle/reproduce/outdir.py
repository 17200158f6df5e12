"""One experiment per directory: its config is recorded there, and another config is refused."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from ..errors import UserError
from .config import ReproduceConfig

CONFIG_FILE = "config.json"


def check_out_dir(cfg: ReproduceConfig, out: Path) -> None:
    """Refuse to mix two experiments in one directory; record the config otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    current = json.loads(json.dumps(asdict(cfg)))
    if path.is_file():
        saved = json.loads(path.read_text())
        # A field added to the config since that run, at its default value, is no difference.
        defaults = {f.name: f.default for f in fields(ReproduceConfig) if f.default is not MISSING}
        defaults = json.loads(json.dumps(defaults))
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k, defaults.get(k)) != current.get(k))
        if changed:
            raise UserError(f"{out} holds an experiment with a different config ({', '.join(changed)} differ); "
                            f"use another --out or the same config")
        return
    path.write_text(json.dumps(current, indent=2) + "\n")
