"""What ds-upcycle adds to a DeepSpeed checkpoint, and how to find one.

A checkpoint tag directory written by train.py holds DeepSpeed's own files plus:
    ds_upcycle.json   model config (rebuilds the model), run metadata
    tokenizer.model   the SentencePiece model its token ids refer to
Training position (data split and samples consumed) travels in DeepSpeed's client state.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..errors import UserError

RUN_FILE = "ds_upcycle.json"
TOKENIZER_FILE = "tokenizer.model"
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class CheckpointRef:
    """A DeepSpeed checkpoint: `save_dir/tag/`."""

    save_dir: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.save_dir / self.tag

    @property
    def run_info(self) -> dict:
        file = self.path / RUN_FILE
        if not file.is_file():
            raise UserError(f"{self.path} has no {RUN_FILE}: not written by ds-upcycle; "
                            f"pass --model to say which model it holds")
        return json.loads(file.read_text())

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.run_info["model"])

    @property
    def tokenizer(self) -> Path | None:
        file = self.path / TOKENIZER_FILE
        return file if file.is_file() else None


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
    shutil.copyfile(tokenizer, tag_dir / TOKENIZER_FILE)
    tmp = tag_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"model": model.to_dict(), **metadata}, indent=2))
    tmp.replace(tag_dir / RUN_FILE)
