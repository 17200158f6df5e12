"""Write layout-independent state as a native DeepSpeed ZeRO-1/2 checkpoint for any target layout.

The result is what `engine.save_checkpoint` of deepspeed 0.19.8 would write for the same state on
`world_size` ranks with `ep_size`, so stock `engine.load_checkpoint` on that layout restores module
weights, fp32 master weights, Adam moments and step, the LR scheduler and client state.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, DS_VERSION, GROUP_PADDINGS, OPTIMIZER_STATE_DICT,
                                            PARAM_ALIGNMENT_PADDINGS, PARAM_SLICE_MAPPINGS, PARTITION_COUNT,
                                            SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from ..errors import UserError
from ..training.checkpoint import RUN_FILE, TOKENIZER_FILE
from .files import save_file, staging_dir, write_text_atomic
from .layout import FlatGroup, flat_group, split_moe_group
from .names import MODEL_STATES, expert_file, split_expert_param, zero_file
from .state import CheckpointSource, MoELayer, NonExpertState, ParamState

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class _Target:
    """The optimizer groups of the target layout, in DeepSpeed's order: non-expert, then expert."""

    world_size: int
    ep_size: int
    dense: list[FlatGroup]      # partitioned over all ranks
    expert: list[FlatGroup]     # local expert names, partitioned over the expert-data-parallel group
    shapes: dict[str, torch.Size]

    @property
    def groups(self) -> list[FlatGroup]:
        return self.dense + self.expert


@dataclass
class _Partition:
    """One rank's slice of one group: fp32 weights and moments, zeros where DeepSpeed pads."""

    layout: FlatGroup
    index: int
    tensors: dict[str, torch.Tensor]

    @classmethod
    def build(cls, layout: FlatGroup, index: int, param_of: Callable[[str], ParamState],
              with_moments: bool) -> _Partition:
        keys = ("fp32", *MOMENTS) if with_moments else ("fp32",)
        tensors = {key: torch.zeros(layout.partition_size, dtype=torch.float32) for key in keys}
        for fragment in layout.fragments(index):
            state = param_of(fragment.name)
            for key, tensor in tensors.items():
                source = getattr(state, key).reshape(-1).narrow(0, fragment.param_start, fragment.numel)
                tensor.narrow(0, fragment.partition_start, fragment.numel).copy_(source)
        return cls(layout, index, tensors)

    @property
    def fp32_without_padding(self) -> torch.Tensor:
        # clone: torch.save of a view would store the whole partition.
        return self.tensors["fp32"][:self.layout.partition_size - self.layout.group_padding(self.index)].clone()


class _ExpertParams:
    """Expert parameters of one ep_rank by local name, fetched one expert at a time.

    The flat order walks the experts one after the other, so keeping the last expert suffices; one
    straddling a partition boundary is fetched again for the next partition. The first fetch of an
    expert also writes its module-weights file.
    """

    def __init__(self, state: CheckpointSource, ep_rank: int, ep_size: int, shapes: dict[str, torch.Size],
                 tag_dir: Path) -> None:
        self.state, self.ep_rank, self.ep_size, self.shapes, self.tag_dir = state, ep_rank, ep_size, shapes, tag_dir
        self.layers = {layer.prefix: layer for layer in state.moe_layers}
        self.current: tuple[tuple[int, int], dict[str, ParamState]] | None = None
        self.written: set[tuple[int, int]] = set()

    def __call__(self, local_name: str) -> ParamState:
        prefix, local, suffix = split_expert_param(local_name)
        layer = self.layers[prefix]
        key = (layer.index, self.ep_rank * (layer.num_experts // self.ep_size) + local)
        if self.current is None or self.current[0] != key:
            self.current = (key, self._fetch(layer, key[1], local))
        return self.current[1][suffix]

    def _fetch(self, layer: MoELayer, expert: int, local: int) -> dict[str, ParamState]:
        params = self.state.expert_state(layer.index, expert)
        if set(params) != set(layer.param_shapes):
            raise UserError(f"{layer.prefix} expert {expert}: parameters {sorted(params)}, "
                            f"expected {list(layer.param_shapes)}")
        with_moments = self.state.meta.optimizer_step is not None
        for suffix, param in params.items():
            _check_param(layer.param_name(expert, suffix), param, self.shapes[layer.param_name(local, suffix)],
                         with_moments)
        if (layer.index, expert) not in self.written:
            dtype = self.state.meta.module_dtype
            module = {layer.param_name(expert, s): p.fp32.to(dtype).clone() for s, p in params.items()}
            save_file(module, self.tag_dir / expert_file(layer.index, expert))
            self.written.add((layer.index, expert))
        return params


def write_checkpoint(state: CheckpointSource, dst_dir: str | os.PathLike, tag: str, world_size: int, ep_size: int,
                     ds_config: dict | None = None, run_info: dict | None = None) -> Path:
    """Write `state` as DeepSpeed checkpoint `dst_dir/tag` for `world_size` ranks and `ep_size`.

    ds_config (default: the source's) is stored in the checkpoint and decides zero stage and
    parameter_alignment. run_info (default: the source's ds_upcycle.json) is written with
    model.num_experts set to the state's expert count. `latest` is set to `tag`. Returns the tag dir.
    """
    meta = state.meta
    ds_config = copy.deepcopy(ds_config if ds_config is not None else meta.ds_config)
    dst_dir = Path(dst_dir)
    _check_request(state, dst_dir, world_size, ep_size, ds_config)
    non_expert = state.non_expert_state()
    target = _target(state, non_expert, world_size, ep_size, ds_config)
    info = _run_info(run_info if run_info is not None else meta.run_info, state.moe_layers)

    def write_tag(tag_dir: Path) -> None:
        tag_dir.mkdir(parents=True, exist_ok=True)
        _write_optimizer_and_expert_files(state, non_expert, target, ds_config, tag_dir)
        _write_model_file(state, non_expert, target, ds_config, tag_dir / MODEL_STATES)
        if info is not None:
            (tag_dir / RUN_FILE).write_text(json.dumps(info, indent=2))
        if meta.tokenizer is not None:
            shutil.copyfile(meta.tokenizer, tag_dir / TOKENIZER_FILE)

    if dst_dir.exists():
        with staging_dir(dst_dir / tag) as tmp:
            write_tag(tmp)
        write_text_atomic(dst_dir / "latest", tag)
    else:
        with staging_dir(dst_dir) as tmp:
            write_tag(tmp / tag)
            (tmp / "latest").write_text(tag)
    return dst_dir / tag


def _check_request(state: CheckpointSource, dst_dir: Path, world_size: int, ep_size: int, ds_config: dict) -> None:
    if world_size < 1 or ep_size < 1 or world_size % ep_size:
        raise UserError(f"world size {world_size} must be a positive multiple of ep_size {ep_size}")
    for layer in state.moe_layers:
        if layer.num_experts % ep_size:
            raise UserError(f"{layer.prefix}: {layer.num_experts} experts are not divisible by ep_size {ep_size}")
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        raise UserError(f"can only write ZeRO stage 1 or 2 checkpoints, the DeepSpeed config has stage "
                        f"{zero.get('stage', 0)}")
    if zero.get("round_robin_gradients") or zero.get("elastic_checkpoint"):
        raise UserError("zero_optimization.round_robin_gradients and elastic_checkpoint are not supported")
    expected = torch.bfloat16 if _bf16(ds_config) else torch.float32
    if ds_config.get("fp16", {}).get("enabled") or state.meta.module_dtype != expected:
        raise UserError(f"can write fp32 and bf16 checkpoints whose DeepSpeed config matches the weights "
                        f"(weights {state.meta.module_dtype}, config {'bf16' if _bf16(ds_config) else 'fp32'})")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise UserError(f"output {dst_dir} exists and is not a directory")
    source = state.meta.source
    if source is not None and dst_dir.resolve() in (source.resolve(), source.resolve().parent):
        raise UserError(f"refusing to write into the source checkpoint's directory {dst_dir}")


def _bf16(ds_config: dict) -> bool:
    return bool(ds_config.get("bf16", {}).get("enabled"))


def _target(state: CheckpointSource, non_expert: NonExpertState, world_size: int, ep_size: int,
            ds_config: dict) -> _Target:
    meta = state.meta
    params = non_expert.params
    element_size = torch.tensor([], dtype=meta.module_dtype).element_size()
    aligned = bool(ds_config.get("zero_optimization", {}).get("parameter_alignment", False))
    shapes: dict[str, torch.Size] = {}
    dense = []
    for group in meta.dense_groups:
        missing = [n for n in group.names if n not in params]
        if missing:
            raise UserError(f"the state has no parameter {missing[0]}")
        shapes.update((n, params[n].fp32.shape) for n in group.names)
        dense.append(flat_group(group.names, [params[n].fp32.numel() for n in group.names], world_size,
                                element_size, aligned))
    extra = set(params) - set(shapes)
    if extra:
        raise UserError(f"parameter {min(extra)} is in no optimizer group of the source")
    names = []
    for layer in state.moe_layers:
        for local in range(layer.num_experts // ep_size):
            for suffix, shape in layer.param_shapes.items():
                names.append(layer.param_name(local, suffix))
                shapes[names[-1]] = torch.Size(shape)
    numels = [shapes[n].numel() for n in names]
    expert = [flat_group(names[c.start:c.stop], numels[c.start:c.stop], world_size // ep_size, element_size, aligned)
              for c in split_moe_group(numels)]
    return _Target(world_size, ep_size, dense, expert, shapes)


def _run_info(info: dict | None, layers: list[MoELayer]) -> dict | None:
    if info is None or "model" not in info or not layers:
        return info
    counts = {layer.num_experts for layer in layers}
    if len(counts) > 1:
        raise UserError(f"ds_upcycle.json holds one num_experts for all MoE layers, the state has {sorted(counts)}")
    info = copy.deepcopy(info)
    info["model"]["num_experts"] = counts.pop()
    return info


def _check_param(name: str, state: ParamState, shape: torch.Size, with_moments: bool) -> None:
    tensors = {"fp32": state.fp32, "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq}
    for key, tensor in tensors.items():
        if key != "fp32" and not with_moments:
            continue
        if tensor is None:
            raise UserError(f"{name}: no {key}, but the optimizer has taken steps")
        if tensor.shape != shape:
            raise UserError(f"{name}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def _write_optimizer_and_expert_files(state: CheckpointSource, non_expert: NonExpertState, target: _Target,
                                      ds_config: dict, tag_dir: Path) -> None:
    """Write every rank's optimizer file, building one partition at a time to bound memory."""
    with_moments = state.meta.optimizer_step is not None
    params = non_expert.params
    for name in params:
        _check_param(name, params[name], target.shapes[name], with_moments)
    expert_dp_size = target.world_size // target.ep_size
    for ep_rank in range(target.ep_size):
        expert_params = _ExpertParams(state, ep_rank, target.ep_size, target.shapes, tag_dir)
        for expert_dp_rank in range(expert_dp_size):
            rank = expert_dp_rank * target.ep_size + ep_rank
            partitions = ([_Partition.build(g, rank, params.__getitem__, with_moments) for g in target.dense]
                          + [_Partition.build(g, expert_dp_rank, expert_params, with_moments) for g in target.expert])
            save_file(_zero_file_state(state, partitions, target.ep_size, ds_config),
                      tag_dir / zero_file(rank, _bf16(ds_config)))
        expected = sum(layer.num_experts // target.ep_size for layer in state.moe_layers)
        assert len(expert_params.written) == expected, "every expert lies in some partition"


def _zero_file_state(state: CheckpointSource, partitions: list[_Partition], ep_size: int, ds_config: dict) -> dict:
    """One rank's zero_pp_rank_*_optim_states.pt, as DeepSpeedZeroOptimizer.state_dict() lays it out."""
    meta = state.meta
    dense_count = len(meta.dense_groups)
    adam_state, param_groups = {}, []
    for index, partition in enumerate(partitions):
        if meta.optimizer_step is not None:
            adam_state[index] = {"step": meta.optimizer_step.clone(),
                                 **{key: partition.tensors[key] for key in MOMENTS}}
        if index < dense_count:
            hypers = meta.dense_groups[index].hypers
        else:
            hypers = {**meta.expert_hypers, "name": f"ep_size_{ep_size}", "moe": True}
        param_groups.append({**hypers, "params": [index]})
    optimizer = {
        **meta.optimizer_extras,
        BASE_OPTIMIZER_STATE: {"state": adam_state, "param_groups": param_groups},
        SINGLE_PARTITION_OF_FP32_GROUPS: [p.fp32_without_padding for p in partitions],
        ZERO_STAGE: ZeroStageEnum(int(ds_config["zero_optimization"]["stage"])),
        GROUP_PADDINGS: [p.layout.group_padding(p.index) for p in partitions],
        PARAM_ALIGNMENT_PADDINGS: [list(p.layout.paddings) for p in partitions],
        PARTITION_COUNT: [p.layout.dp_size for p in partitions],
        DS_VERSION: deepspeed.__version__,
        PARAM_SLICE_MAPPINGS: [OrderedDict((f.name, fragment_address(numel=f.numel, start=f.partition_start))
                                           for f in p.layout.fragments(p.index)) for p in partitions],
    }
    return {OPTIMIZER_STATE_DICT: optimizer, "ds_config": ds_config, DS_VERSION: deepspeed.__version__}


def _write_model_file(state: CheckpointSource, non_expert: NonExpertState, target: _Target, ds_config: dict,
                      path: Path) -> None:
    """mp_rank_00_model_states.pt: non-expert weights and buffers, layout, training progress, client state."""
    meta = state.meta
    if set(non_expert.buffers) != set(meta.buffer_names):
        raise UserError(f"the state's buffers {sorted(non_expert.buffers)} differ from the source's "
                        f"{sorted(meta.buffer_names)}")
    module = OrderedDict()
    for key in meta.module_keys:
        if key in non_expert.params:
            module[key] = non_expert.params[key].fp32.to(meta.module_dtype).clone()
        elif key in non_expert.buffers:
            module[key] = non_expert.buffers[key].clone()
    for alias, holder in meta.shared_params.items():
        module[alias] = module[holder].clone()  # DeepSpeed clones every tensor before saving
    extras = meta.model_extras
    # ZeRO-2 records frozen parameters (none here: the reader refuses them), ZeRO-1 does not.
    frozen = OrderedDict() if int(ds_config["zero_optimization"]["stage"]) == 2 else None
    checkpoint = {
        "module": module,
        "buffer_names": list(meta.buffer_names),
        "optimizer": None,
        # As DeepSpeed records it on rank 0: experts under the local ids of ep_rank 0, shapes as tuples.
        "param_shapes": [OrderedDict((n, tuple(target.shapes[n])) for n in g.names) for g in target.groups],
        "frozen_param_shapes": frozen,
        "shared_params": dict(meta.shared_params),
        "frozen_param_fragments": copy.copy(frozen),
        "lr_scheduler": meta.lr_scheduler,
        "data_sampler": extras.get("data_sampler"),
        "random_ltd": extras.get("random_ltd"),
        "skipped_steps": meta.skipped_steps,
        "global_steps": meta.global_steps,
        "global_samples": meta.global_samples,
        "dp_world_size": target.world_size,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": extras.get("checkpoint_parallel_dimensions",
                                                     {"pp_degree": 1, "tp_degree": 1}),
        "ds_config": ds_config,
        DS_VERSION: deepspeed.__version__,
        "num_experts": [layer.num_experts for layer in state.moe_layers],
        "ds_autoep_layers": None,
        **meta.client_state,
    }
    save_file(checkpoint, path)
