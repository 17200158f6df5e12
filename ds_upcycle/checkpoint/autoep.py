"""What a DeepSpeed AutoEP checkpoint (no ZeRO or ZeRO-1/2, deepspeed 0.19.x) adds to the MoE layout.

An AutoEP engine saves the files of the legacy MoE layout (a model file, per-expert weight files,
optimizer files) with three differences, handled here and in MoELayer so that each format keeps
one reader and the writer stays one: the experts of a rank are one fused parameter per weight in
the optimizer state (MoELayer.flat_params), the model file describes every AutoEP layer in
`ds_autoep_layers` (also kept in `universal_checkpoint_info` for ds_to_universal), and the router
is saved under a second module name. The entries are rebuilt for the target layout with DeepSpeed's own placement and
affine-map functions, as rank 0 of that layout would write them.

Supported: the uniform contiguous expert placement (the only one 0.19.8 builds), per-expert
files, routers with a weight only (the Qwen3-MoE and Mixtral presets); refused with a reason:
router biases, score-correction buffers, ZeRO-3 and expert-tensor-parallel (folded) checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.checkpoint.autoep_affine import (autoep_placement_to_affine_map,
                                               legacy_uniform_autoep_placement_descriptor)
from deepspeed.checkpoint.constants import (AFFINE_MAP_PARAMS, AFFINE_MAP_VERSION, AUTOEP_AFFINE_MAPS,
                                            AUTOEP_EXPERT_KEY_PREFIX, AUTOEP_EXPERT_PLACEMENT, AUTOEP_LAYERS_KEY,
                                            AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY,
                                            AUTOEP_ZERO3_EXPERT_STATE_FORMAT_VERSION_KEY, UNIVERSAL_CHECKPOINT_INFO)
from deepspeed.checkpoint.affine import AFFINE_MAP_FORMAT_VERSION
from deepspeed.module_inject.auto_ep_presets.registry import get_preset

from ..errors import UserError
from .names import AUTOEP_EXPERT_WEIGHTS, autoep_fused_param, autoep_router_weight
from .state import MoELayer

PER_EXPERT_FILES = "per_expert_files"


def is_autoep(model: dict) -> bool:
    return bool(model.get(AUTOEP_LAYERS_KEY))


def autoep_layers(model: dict, shapes: dict[str, torch.Size], ep_size: int, tag_dir: Path) -> list[MoELayer]:
    """The AutoEP layers of a model file, checked against the fused expert parameters' shapes."""
    entries = model[AUTOEP_LAYERS_KEY]
    if model.get("num_experts") != [e.get("num_experts") for e in entries]:
        raise UserError(f"{tag_dir}: num_experts {model.get('num_experts')} does not match ds_autoep_layers")
    layers = []
    for index, entry in enumerate(entries):
        path, count = entry.get("module_path"), entry.get("num_experts")
        where = f"{tag_dir}: AutoEP layer {path}"
        if entry.get("moe_layer_id") != index or entry.get(AUTOEP_EXPERT_KEY_PREFIX) != f"{path}.experts":
            raise UserError(f"{where}: unexpected layer id or expert key prefix in ds_autoep_layers")
        if entry.get("folding") or entry.get("tp_size", 1) != 1:
            raise UserError(f"{where}: expert tensor parallelism (folded AutoEP) is not supported")
        if entry.get(AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY, PER_EXPERT_FILES) != PER_EXPERT_FILES:
            raise UserError(f"{where}: expert state format {entry[AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY]} is not "
                            f"supported (only per-expert files: ZeRO stage 1 and 2)")
        if entry.get("ep_size") != ep_size or count % ep_size or entry.get("num_local_experts") != count // ep_size:
            raise UserError(f"{where}: ep_size {entry.get('ep_size')} and {entry.get('num_local_experts')} local "
                            f"experts do not match the optimizer files (ep_size {ep_size}, {count} experts)")
        if entry.get(AUTOEP_EXPERT_PLACEMENT) != legacy_uniform_autoep_placement_descriptor(count, count // ep_size,
                                                                                            ep_size):
            raise UserError(f"{where}: only the uniform contiguous expert placement is supported")
        expert_shapes = {}
        for weight in AUTOEP_EXPERT_WEIGHTS:
            shape = shapes.get(autoep_fused_param(path, weight))
            if shape is None or len(shape) != 3 or shape[0] != count // ep_size:
                raise UserError(f"{where}: fused expert weight {weight} has shape "
                                f"{None if shape is None else tuple(shape)}, expected [{count // ep_size}, ., .]")
            expert_shapes[weight] = torch.Size(shape[1:])
        layers.append(MoELayer(index, path, count, expert_shapes, autoep=True))
    return layers


def check_router(layers: list[MoELayer], params: list[str], buffers: list[str], tag_dir: Path) -> None:
    """Every AutoEP router has exactly its weight rows (and, with balancing, the selection bias)."""
    for layer in layers:
        inside = [n for n in [*params, *buffers] if n.startswith(f"{layer.prefix}.router.")]
        if inside != [autoep_router_weight(layer.prefix)]:
            extra = sorted(set(inside) - {autoep_router_weight(layer.prefix)})
            raise UserError(f"{tag_dir}: AutoEP router of {layer.prefix} has "
                            f"{extra[0] if extra else 'no weight'}; only routers with a weight alone (Qwen3-MoE, "
                            f"Mixtral presets) are supported")


def module_aliases(keys: list[str], layers: list[MoELayer], params: list[str], buffers: list[str],
                   module: dict, tag_dir: Path) -> dict[str, str]:
    """Module keys that name an AutoEP router a second time (P.gate.gate.weight for P.router.gate.weight)."""
    known, aliases = set(params) | set(buffers), {}
    for key in keys:
        if key in known:
            continue
        for layer in layers:
            head, _, rest = key.removeprefix(layer.prefix + ".").partition(".")
            holder = f"{layer.prefix}.router.{rest}"
            if key.startswith(layer.prefix + ".") and head and holder in known:
                if not torch.equal(module[key], module[holder]):
                    raise UserError(f"{tag_dir}: {key} differs from {holder}, which it should name again")
                aliases[key] = holder
    return aliases


def autoep_model_entries(layers: list[MoELayer], ep_size: int, world_size: int, source_info: dict | None) -> dict:
    """`ds_autoep_layers` and `universal_checkpoint_info` of the model file, as rank 0 of the layout saves them."""
    entries = []
    for layer in layers:
        local = layer.num_experts // ep_size
        placement = legacy_uniform_autoep_placement_descriptor(layer.num_experts, local, ep_size)
        maps = {autoep_fused_param(layer.prefix, weight):
                autoep_placement_to_affine_map(placement, [layer.num_experts, *shape]).to_dict()
                for weight, shape in layer.param_shapes.items()}
        entries.append({
            "moe_layer_id": layer.index, "module_path": layer.prefix, "num_experts": layer.num_experts,
            "num_local_experts": local, "ep_size": ep_size, AUTOEP_EXPERT_PLACEMENT: placement,
            AUTOEP_AFFINE_MAPS: {AFFINE_MAP_VERSION: AFFINE_MAP_FORMAT_VERSION, AFFINE_MAP_PARAMS: maps},
            AUTOEP_EXPERT_KEY_PREFIX: f"{layer.prefix}.experts",
            AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY: PER_EXPERT_FILES, AUTOEP_ZERO3_EXPERT_STATE_FORMAT_VERSION_KEY: None,
            "ep_group_name": f"ep_size_{ep_size}", "ep_rank": 0, "expert_data_parallel_rank": 0,
            "expert_data_parallel_world_size": world_size // ep_size,
            "global_expert_start": 0, "global_expert_end": local,
        })
    info = {**(source_info or {}), AUTOEP_LAYERS_KEY: entries}
    return {AUTOEP_LAYERS_KEY: entries, UNIVERSAL_CHECKPOINT_INFO: info}


def with_autoep_size(ds_config: dict, ep_size: int) -> dict:
    """The DeepSpeed config stored with the checkpoint, naming the layout it was written for."""
    expert_parallel = ds_config.get("expert_parallel")
    if not isinstance(expert_parallel, dict):
        return ds_config
    return {**ds_config, "expert_parallel": {**expert_parallel, "autoep_size": ep_size}}


def autoep_score_func(ds_config: dict) -> str | None:
    """softmax or sigmoid: the config's override, else its preset's; None when neither is named."""
    expert_parallel = ds_config.get("expert_parallel") or {}
    if expert_parallel.get("score_func"):
        return expert_parallel["score_func"]
    preset = expert_parallel.get("preset_model")
    if not preset:
        return None
    try:
        return get_preset(preset).score_func
    except ValueError:  # a preset this DeepSpeed does not know
        return None
