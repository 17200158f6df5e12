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
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

from .. import __version__
from ..atomic import write_json_atomic
from ..config import ModelConfig
from ..data.config import DataConfig
from ..data.tokenizer import copy_tokenizer, find_tokenizer
from ..errors import UserError
from .names import MODEL_STATES

RUN_FILE = "ds_upcycle.json"


@dataclass(frozen=True)
class ImportOrigin:
    """The transformers model a checkpoint was imported from."""

    model_type: str
    architecture: str
    max_position_embeddings: int
    directory: str


@dataclass(frozen=True)
class RunRecord:
    """ds_upcycle.json: the model config that rebuilds the model, and what it was trained on.

    Attributes:
        model: the model config.
        global_step, tokens_seen, split: where the run stood when saved (the exact data position
            travels in DeepSpeed's client state).
        data: the training data settings (cache_dir left out); None for an imported model, which
            has no training data of its own.
        context: an imported model's sequence length (what eval windows and calibration use);
            a trained model's is data.seq_len.
        run: the run settings that a resumed train.py compares with its own (training/loop.py).
        imported_from: the transformers model it came from, if imported (the training runs that
            continue it keep it, so that export prefers that class).
        optimizer_state: False when the optimizer holds no state (an import): train.py then loads
            the module weights only.
        copy_of: per MoE layer, the expert of the checkpoint that the last `ds-upcycle expand`
            read that every expert was copied from (the runs that continue it keep it, and record
            at evaluations how far the copies have moved apart: trained/copies.py); None: never
            expanded.
        lift_groups_at: the global step after which train.py lifts the model's routing groups
            (`ds-upcycle expand --lift-groups-after`); None: never.
        version: the ds-upcycle version that wrote it.
    """

    model: ModelConfig
    global_step: int = 0
    tokens_seen: int = 0
    split: str | None = None
    data: DataConfig | None = None
    context: int | None = None
    run: dict = field(default_factory=dict)
    imported_from: ImportOrigin | None = None
    optimizer_state: bool = True
    copy_of: tuple[tuple[int, ...], ...] | None = None
    lift_groups_at: int | None = None
    version: str = __version__

    def __post_init__(self) -> None:
        if self.copy_of is not None:
            object.__setattr__(self, "copy_of", tuple(tuple(int(e) for e in layer) for layer in self.copy_of))

    @property
    def seq_len(self) -> int | None:
        """The training sequence length: the context the model has learnt to use."""
        return self.data.seq_len if self.data is not None else self.context

    @property
    def data_source(self) -> str | None:
        return self.data.source if self.data is not None else None

    def with_experts(self, counts: list[int], route_groups: list[list[int]] | None = None) -> RunRecord:
        """The record of the same run with `counts` experts in its MoE layers, in order (layer_experts
        where they differ), and, if given, new routing groups (a grouped model's must cover them)."""
        changes: dict = ({"num_experts": counts[0], "layer_experts": None} if len(set(counts)) == 1
                         else {"layer_experts": list(counts)})
        if route_groups is not None:
            changes["route_groups"] = route_groups
        return replace(self, model=self.model.replace(**changes))

    def to_dict(self) -> dict:
        out: dict = {"model": self.model.to_dict(), "global_step": self.global_step, "tokens_seen": self.tokens_seen}
        if self.split is not None:
            out["split"] = self.split
        if not self.optimizer_state:
            out["optimizer_state"] = False
        if self.data is not None:
            out["data"] = {k: v for k, v in asdict(self.data).items() if k != "cache_dir"}
        elif self.context is not None:
            out["data"] = {"seq_len": self.context}
        if self.run:
            out["run"] = dict(self.run)
        if self.imported_from is not None:
            out["imported_from"] = asdict(self.imported_from)
        if self.copy_of is not None:
            out["copy_of"] = [list(layer) for layer in self.copy_of]
        if self.lift_groups_at is not None:
            out["lift_groups_at"] = self.lift_groups_at
        out["ds_upcycle_version"] = self.version
        return out

    @classmethod
    def from_dict(cls, values: dict, where: Path | str = RUN_FILE) -> RunRecord:
        """Any record ds-upcycle has written; fields an older version did not write take their defaults."""
        if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
            raise UserError(f"{where} records no model config")
        data = values.get("data") or {}
        known = {f.name for f in fields(DataConfig)} - {"cache_dir"}
        imported = values.get("imported_from")
        try:
            return cls(
                model=ModelConfig.from_dict(values["model"]),
                global_step=int(values.get("global_step") or 0), tokens_seen=int(values.get("tokens_seen") or 0),
                split=values.get("split"),
                data=DataConfig(**{k: v for k, v in data.items() if k in known}) if "source" in data else None,
                context=None if "source" in data else data.get("seq_len"),
                run=dict(values.get("run") or {}),
                imported_from=ImportOrigin(**imported) if imported else None,
                optimizer_state=values.get("optimizer_state", True) is not False,
                copy_of=values.get("copy_of"), lift_groups_at=values.get("lift_groups_at"),
                version=str(values.get("ds_upcycle_version", "unknown")))
        except TypeError as err:
            raise UserError(f"{where} is not a ds-upcycle run record: {err}") from None


def read_run_record(path: Path) -> RunRecord | None:
    """The run record at `path`, None if there is none."""
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    return RunRecord.from_dict(values, path)


def write_run_record(tag_dir: Path, record: RunRecord) -> None:
    write_json_atomic(tag_dir / RUN_FILE, record.to_dict())


@dataclass(frozen=True)
class CheckpointRef:
    """A DeepSpeed checkpoint: `save_dir/tag/`."""

    save_dir: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.save_dir / self.tag

    @property
    def has_run_record(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    @cached_property
    def run_record(self) -> RunRecord:
        record = read_run_record(self.path / RUN_FILE)
        if record is None:
            raise UserError(f"{self.path} has no {RUN_FILE}: it was not written by ds-upcycle (a script with "
                            f"DeepSpeed's own MoE gate, say), so the model it holds is unknown")
        return record

    @property
    def model_config(self) -> ModelConfig:
        return self.run_record.model

    @property
    def has_optimizer_state(self) -> bool:
        return self.run_record.optimizer_state

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


def write_run_files(tag_dir: Path, record: RunRecord, tokenizer: Path) -> None:
    """What ds-upcycle adds to a tag directory that DeepSpeed writes: the run record and the tokenizer."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(tokenizer, tag_dir)
    write_run_record(tag_dir, record)
