"""`ds-upcycle import`: a local transformers MoE directory as a DeepSpeed checkpoint.

The weights go through their family's name table into our model's names, one tensor at a time as
the writer asks for it, and are written as the checkpoint DeepSpeed saves for an engine without an
optimizer: module weights only, in the release's dtype (a release has no optimizer state, and fp32
masters equal to bf16 weights would only take 4x the disk). The run record says so
(`optimizer_state: false`), and train.py then loads the module weights only, which fits any layout
and precision; `ds-upcycle expand` reads it like any checkpoint (its masters are the weights) and
writes its expansion in the same form. The record also says how continued training balances the experts:
as the release was trained (`release_balancing`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from ..atomic import check_destination
from ..checkpoint import (CheckpointSource, ImportOrigin, ProgressSource, RunRecord, ScratchFiles, module_state,
                          write_checkpoint)
from ..config import ModelConfig
from ..data.tokenizer import load_tokenizer, tokenizer_file
from ..errors import UserError
from ..model import Transformer
from .family import Family
from .files import WeightFiles
from .fused import per_expert_view
from .registry import export_family, import_family

IMPORT_TAG = "imported"
# The sequence length recorded for an imported model (what eval windows and calibration batches use):
# its max_position_embeddings, up to this (releases state 32k-128k, far beyond a CPU calibration batch).
CONTEXT_CAP = 4096

# A release's router_aux_loss_coef when its config.json names none (transformers' Qwen3-MoE and
# Mixtral default), and the loss-free step ds-upcycle trains with.
RELEASE_AUX_LOSS_COEF = 0.001
LOSS_FREE_STEP = ModelConfig.route_bias_update


@dataclass
class ImportResult:
    checkpoint: Path
    family: Family
    config: ModelConfig

    @property
    def balancing(self) -> str:
        """How continued training balances the imported model's experts, and what else it could do."""
        cfg = self.config
        if cfg.route_bias_update > 0:
            return (f"balancing: loss-free (the selection bias of {self.family.architecture}, step "
                    f"{cfg.route_bias_update:g})")
        loss_free = cfg.replace(route_bias_update=LOSS_FREE_STEP, aux_loss_coef=0.0)
        try:
            then = f"exports as {export_family(loss_free, has_bias=True).architecture}"
        except UserError:
            then = "exports to no transformers class"
        return (f"balancing: auxiliary loss (coefficient {cfg.aux_loss_coef:g}), as the release was trained, since "
                f"{self.family.architecture} has no selection bias to carry a loss-free one; with train.py --set "
                f"route_bias_update={LOSS_FREE_STEP:g} --set aux_loss_coef=0 it balances loss-free and then {then}")


def release_balancing(family: Family, cfg: ModelConfig, hf: dict) -> ModelConfig:
    """How continued training balances an imported model: as the release did, so that what it learns
    still exports as its own class.

    A family with a selection bias (ERNIE 4.5, GLM-4 MoE) trains it loss-free. One without (Qwen3-MoE,
    OLMoE, Mixtral) keeps its bias at zero and uses the release's auxiliary loss: transformers adds
    router_aux_loss_coef * E * sum_i f_i P_i once over the tokens of all layers, with f_i counted
    over all K choices (K times our share); ours is summed over the MoE layers, so the same weight
    is router_aux_loss_coef * K / (MoE layers).
    """
    if family.bias_name is not None:
        return cfg
    coef = float(hf.get("router_aux_loss_coef") or RELEASE_AUX_LOSS_COEF)
    return cfg.replace(route_bias_update=0.0, aux_loss_coef=coef * cfg.top_k / len(cfg.moe_layer_ids))


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
    """Write the transformers model in `hf_dir` as DeepSpeed checkpoint `out_dir` (save dir, tag
    `imported`): its module weights in the release's dtype, as DeepSpeed saves an engine without an
    optimizer, which an engine on any layout loads."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_destination(out, force)
    family, hf = read_hf_config(hf_dir)
    cfg = release_balancing(family, family.config_from_hf(hf), hf)
    tokenizer = tokenizer_file(hf_dir)
    load_tokenizer(tokenizer)
    # Read one tensor at a time, as the writer asks: memory holds the non-expert weights and an expert.
    tensors = per_expert_view(family, cfg, WeightFiles(hf_dir))  # fused experts shown one by one
    _check_names(family, cfg, tensors, hf_dir)
    state = family.from_hf(cfg, tensors)
    positions = int(hf.get("max_position_embeddings") or CONTEXT_CAP)
    record = RunRecord(cfg, optimizer_state=False, context=min(positions, CONTEXT_CAP),
                       imported_from=ImportOrigin(family.model_type, family.architecture, positions,
                                                  hf_dir.resolve().name))
    # The non-expert weights wait for the model file in scratch files, not in memory.
    with ScratchFiles(out) as scratch:
        source = _checkpoint_state(cfg, state, tokenizer, record, scratch.park)
        write_checkpoint(ProgressSource(source), out, IMPORT_TAG, world_size=1, ep_size=1, replace=force)
    return ImportResult(out, family, cfg)


def _check_names(family: Family, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], hf_dir: Path) -> None:
    """The family's tensors must be exactly the ones our model needs (read by name: only a tied head
    stored anyway and unexpected tensors are read)."""
    expected = {theirs for _, theirs in family.name_pairs(cfg)}
    names = set(tensors)
    if cfg.tie_embeddings and "lm_head.weight" in names:  # some releases store the tied head too
        embedding = tensors.get("model.embed_tokens.weight")  # a missing one is reported below
        if embedding is not None and not torch.equal(tensors["lm_head.weight"], embedding):
            raise UserError(f"{hf_dir} ties its embeddings (tie_word_embeddings) but stores a different "
                            f"lm_head.weight")
        names.discard("lm_head.weight")
    # Buffers some releases carry, and zero-width tensors (a shared expert of width 0): nothing to import.
    extra = sorted(n for n in names - expected if not n.endswith("rotary_emb.inv_freq") and tensors[n].numel())
    if family.zero_shared_expert:  # a shared expert of zeros adds nothing; any other is a feature we lack
        shared = tuple(family.shared_expert_prefix(i) for i in cfg.moe_layer_ids)
        working = next((n for n in extra if n.startswith(shared) and tensors[n].count_nonzero()), None)
        if working is not None:
            raise UserError(f"{hf_dir} has shared experts ({working} is not zero), which ds-upcycle's model "
                            f"does not have; it cannot be imported")
        extra = [n for n in extra if not n.startswith(shared)]
    missing = sorted(expected - names)
    if missing:
        raise UserError(f"{hf_dir} lacks weight {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                else ""))
    if extra:
        raise UserError(f"{hf_dir} has weights ds-upcycle's model has no place for ({extra[0]}"
                        + (f" and {len(extra) - 1} more)" if len(extra) > 1 else ")"))


class _InModuleOrder(Mapping):
    """The imported state under our names in the module's order, a tied name reading its holder;
    each tensor is read when asked for."""

    def __init__(self, names: list[str], state: Mapping[str, torch.Tensor], shared: dict[str, str]) -> None:
        self.names, self.state, self.shared = names, state, shared

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[self.shared.get(name, name)]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _checkpoint_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor], tokenizer: Path,
                      record: RunRecord, park: Callable[[torch.Tensor], torch.Tensor]) -> CheckpointSource:
    """The imported weights as the checkpoint DeepSpeed saves for an engine without an optimizer."""
    with torch.device("meta"):  # only the names and their order are read from it
        model = Transformer(cfg)
    shared = {"output.weight": "tok_embeddings.weight"} if cfg.tie_embeddings else {}
    ordered = _InModuleOrder(list(model.state_dict()), state, shared)
    return module_state(ordered, [n for n, _ in model.named_parameters()], shared,
                        {"ds_upcycle": {"position": {"split": "pretrain", "samples": 0, "tokens": 0}}},
                        record, tokenizer, park)
