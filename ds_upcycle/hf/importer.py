"""`ds-upcycle import`: a local transformers MoE directory as a DeepSpeed checkpoint.

The weights go through their family's name table into our model's names and are written as the
checkpoint DeepSpeed saves for a run before its first step (one process, ZeRO-2, fp32): module
weights, fp32 master weights, no Adam moments (a release has none). The run record says so
(`optimizer_state: false`), and train.py then loads the module weights only, which fits any later
layout and precision; `ds-upcycle expand` reads it like any checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from ..atomic import check_destination
from ..checkpoint import CheckpointState, ImportOrigin, RunRecord, fresh_state, write_checkpoint
from ..config import ModelConfig
from ..data.tokenizer import load_tokenizer, tokenizer_file
from ..errors import UserError
from ..model import Transformer
from .family import Family
from .files import read_weights
from .registry import import_family

IMPORT_TAG = "imported"
# The sequence length recorded for an imported model (what eval windows and calibration batches use):
# its max_position_embeddings, up to this (releases state 32k-128k, far beyond a CPU calibration batch).
CONTEXT_CAP = 4096
# The DeepSpeed config recorded in the checkpoint; train.py loads its module weights only, whatever
# config it trains with.
SAVE_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
               "zero_optimization": {"stage": 2}, "steps_per_print": 1 << 30}


@dataclass
class ImportResult:
    checkpoint: Path
    family: Family
    config: ModelConfig


def read_hf_config(hf_dir: Path) -> tuple[Family, dict]:
    """The family and the config of a model directory, as transformers reads it: its own defaults for
    fields the file leaves out, and every field under its aliases too (`num_experts` and
    `num_local_experts`), since releases of different transformers versions name them differently."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} is not a transformers model directory (no config.json)")
    try:
        family = import_family(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    try:
        config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (ValueError, TypeError, OSError) as err:
        raise UserError(f"transformers cannot read {path}: {' '.join(str(err).split())[:200]}") from None
    values = config.to_dict()
    for alias, name in type(config).attribute_map.items():
        values.setdefault(alias, values.get(name))
    return family, values


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, force: bool = False) -> ImportResult:
    """Write the transformers model in `hf_dir` as DeepSpeed checkpoint `out_dir` (save dir, tag `imported`)."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    family, hf = read_hf_config(hf_dir)
    cfg = family.config_from_hf(hf)
    tokenizer = tokenizer_file(hf_dir)
    load_tokenizer(tokenizer)
    check_destination(out, force)
    state = family.from_hf(cfg, _checked_tensors(family, cfg, read_weights(hf_dir), hf_dir))
    positions = int(hf.get("max_position_embeddings") or CONTEXT_CAP)
    record = RunRecord(cfg, optimizer_state=False, context=min(positions, CONTEXT_CAP),
                       imported_from=ImportOrigin(family.model_type, family.architecture, positions,
                                                  hf_dir.resolve().name))
    write_checkpoint(_checkpoint_state(cfg, state, tokenizer, record), out, IMPORT_TAG, world_size=1, ep_size=1,
                     replace=force)
    return ImportResult(out, family, cfg)


def _checked_tensors(family: Family, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                     hf_dir: Path) -> dict[str, torch.Tensor]:
    """The family's tensors, after checking that they are exactly the ones our model needs."""
    expected = {theirs for _, theirs in family.name_pairs(cfg)}
    if cfg.tie_embeddings and "lm_head.weight" in tensors:  # some releases store the tied head too
        embedding = tensors.get("model.embed_tokens.weight")  # a missing one is reported below
        if embedding is not None and not torch.equal(tensors["lm_head.weight"], embedding):
            raise UserError(f"{hf_dir} ties its embeddings (tie_word_embeddings) but stores a different "
                            f"lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    # Buffers some releases carry, and zero-width tensors (a shared expert of width 0): nothing to import.
    extra = sorted(n for n in set(tensors) - expected if not n.endswith("rotary_emb.inv_freq") and tensors[n].numel())
    missing = sorted(expected - set(tensors))
    if missing:
        raise UserError(f"{hf_dir} lacks weight {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                else ""))
    if extra:
        raise UserError(f"{hf_dir} has weights ds-upcycle's model has no place for ({extra[0]}"
                        + (f" and {len(extra) - 1} more)" if len(extra) > 1 else ")"))
    return {name: tensors[name] for name in expected}


def _checkpoint_state(cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Path,
                      record: RunRecord) -> CheckpointState:
    """The imported weights as the checkpoint DeepSpeed would save before a first step."""
    with torch.device("meta"):  # only the names and their order are read from it
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    ordered = {name: state[name] for name in model.state_dict()}
    shared = {"output.weight": "tok_embeddings.weight"} if cfg.tie_embeddings else {}
    return fresh_state(ordered, [n for n, _ in model.named_parameters()], shared, SAVE_CONFIG,
                       {"ds_upcycle": {"position": {"split": "pretrain", "samples": 0, "tokens": 0}}},
                       record, tokenizer)
