"""What ds-upcycle adds to a DeepSpeed checkpoint, and how to find one.

A checkpoint tag directory written by train.py holds DeepSpeed's own files plus:
    ds_upcycle.json   model config (rebuilds the model), data and run settings
    tokenizer.model   the SentencePiece model its token ids refer to (or tokenizer.json and
                      tokenizer_config.json, a Hugging Face tokenizer)
Training position (data split and samples consumed) travels in DeepSpeed's client state; the save
directory above the tag holds `latest` and metrics.jsonl (metrics.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json_atomic
from ..config import ModelConfig
from ..data.tokenizer import copy_tokenizer, find_tokenizer
from ..errors import UserError
from .names import MODEL_STATES

RUN_FILE = "ds_upcycle.json"
# Run-record keys of a checkpoint imported from a transformers model: the family it came from, and
# `false` for a checkpoint whose optimizer holds no state (train.py then loads module weights only).
IMPORTED_KEY = "imported_from"
OPTIMIZER_STATE_KEY = "optimizer_state"


def read_run_info(path: Path) -> dict | None:
    """The run record at `path`, None if there is none."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


@dataclass(frozen=True)
class CheckpointRef:
    """A DeepSpeed checkpoint: `save_dir/tag/`."""

    save_dir: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.save_dir / self.tag

    @property
    def has_run_info(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    @property
    def run_info(self) -> dict:
        info = read_run_info(self.path / RUN_FILE)
        if info is None:
            raise UserError(f"{self.path} has no {RUN_FILE}: it was not written by ds-upcycle (a script with "
                            f"DeepSpeed's own MoE gate, say), so the model it holds is unknown")
        return info

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.run_info["model"])

    @property
    def has_optimizer_state(self) -> bool:
        return self.run_info.get(OPTIMIZER_STATE_KEY, True) is not False

    @property
    def tokenizer(self) -> Path | None:
        return find_tokenizer(self.path)


def find_checkpoint(path: str | os.PathLike) -> CheckpointRef:
    """Accept a save directory (with `latest`) or a tag directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (path / tag / MODEL_STATES).is_file():
            raise UserError(f"{latest} names tag {tag!r}, but {path / tag} holds no {MODEL_STATES}")
        return CheckpointRef(path, tag)
    if (path / MODEL_STATES).is_file():
        return CheckpointRef(path.parent, path.name)
    raise UserError(f"not a DeepSpeed checkpoint: {path} (no 'latest' file and no {MODEL_STATES})")


def latest_checkpoint(save_dir: str | os.PathLike | None) -> CheckpointRef | None:
    """The checkpoint to resume from in a save directory, if it has one."""
    if save_dir and (Path(save_dir) / "latest").is_file():
        return find_checkpoint(save_dir)
    return None


def write_run_files(tag_dir: Path, model: ModelConfig, tokenizer: Path, metadata: dict) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(tokenizer, tag_dir)
    write_json_atomic(tag_dir / RUN_FILE, {"model": model.to_dict(), **metadata})
