"""One experiment per directory: its config is recorded there, and another config is refused."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from ..atomic import check_writable, write_json_atomic
from ..errors import UserError
from .config import ReproduceConfig

CONFIG_FILE = "config.json"
# Fields that say how many times the experiment runs, not what it is: adding a seed to a finished
# set of seeds reuses their runs.
REPETITION_FIELDS = {"seeds"}


def check_out_dir(cfg: ReproduceConfig, out: Path) -> None:
    """Refuse to mix two experiments in one directory; record the config otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    check_writable(out, "--out directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    current = json.loads(json.dumps(asdict(cfg)))
    if path.is_file():
        saved = json.loads(path.read_text())
        # A field added to the config since that run, at its default value, is no difference.
        defaults = {f.name: f.default for f in fields(ReproduceConfig) if f.default is not MISSING}
        defaults = json.loads(json.dumps(defaults))
        changed = sorted(k for k in (set(saved) | set(current)) - REPETITION_FIELDS
                         if saved.get(k, defaults.get(k)) != current.get(k))
        if changed:
            raise UserError(f"{out} holds an experiment with a different config ({', '.join(changed)} differ); "
                            f"use another --out or the same config")
    write_json_atomic(path, current)
