"""Write layout-independent state as a native DeepSpeed checkpoint (no ZeRO, ZeRO-1 or 2) for any target layout.

The result is what `engine.save_checkpoint` of deepspeed 0.19.8 would write for the same state on
`world_size` ranks with `ep_size`, so stock `engine.load_checkpoint` on that layout restores module
weights, fp32 master weights, Adam moments and step, the LR scheduler and client state.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, DS_VERSION, GROUP_PADDINGS, OPTIMIZER_STATE_DICT,
                                            PARAM_ALIGNMENT_PADDINGS, PARAM_SLICE_MAPPINGS, PARTITION_COUNT,
                                            SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from ..atomic import staged_dir, write_text_atomic
from ..config import check_expert_parallel
from ..data.tokenizer import copy_tokenizer
from ..errors import UserError
from .autoep import autoep_model_entries, with_autoep_size
from .ds_config import bf16_enabled, zero_stage
from .files import open_for_filling, save_file, save_skeleton
from .layout import FlatGroup, Fragment, flat_group, split_moe_group
from .names import MODEL_STATES, expert_file, zero_file
from .run_record import write_run_record
from .stage0 import prepare_stage0_files
from .state import MOMENTS, CheckpointSource, MoELayer, NonExpertState, ParamState


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


def write_checkpoint(state: CheckpointSource, dst_dir: str | os.PathLike, tag: str, world_size: int, ep_size: int,
                     ds_config: dict | None = None, replace: bool = False,
                     finish: Callable[[Path], None] | None = None) -> Path:
    """Write `state` as DeepSpeed checkpoint `dst_dir/tag` for `world_size` ranks and `ep_size`.

    ds_config (default: the source's) is stored in the checkpoint and decides zero stage and
    parameter_alignment. The source's run record, if it has one, is written with the state's expert
    counts. `latest` is set to `tag`. Returns the tag dir.

    A new (or empty) dst_dir appears whole, `latest` included; so does a replaced one (`replace`); into
    an existing save directory the new tag appears whole, then `latest` names it. `finish(tag_dir)`
    adds files to the tag before it appears (a manifest, say).
    """
    meta = state.meta
    ds_config = copy.deepcopy(ds_config if ds_config is not None else meta.ds_config)
    autoep = any(layer.autoep for layer in state.moe_layers)
    if autoep:
        ds_config = with_autoep_size(ds_config, ep_size)
    dst_dir = Path(dst_dir)
    _check_request(state, dst_dir, world_size, ep_size, ds_config)
    non_expert = state.non_expert_state()
    target = _target(state, non_expert, world_size, ep_size, ds_config)
    record = meta.run_record
    if record is not None and state.moe_layers:
        record = record.with_experts([layer.num_experts for layer in state.moe_layers])

    def write_tag(tag_dir: Path) -> None:
        tag_dir.mkdir(parents=True, exist_ok=True)
        with_moments = meta.optimizer_step is not None
        for name, param in non_expert.params.items():
            _check_param(name, param, target.shapes[name], with_moments)
        model_file = _model_file_state(state, non_expert, target, ds_config)
        with ExitStack() as stack:
            if zero_stage(ds_config) == 0:
                fill_expert = prepare_stage0_files(state, non_expert, ep_size, tag_dir, model_file, stack)
            else:
                save_file(model_file, tag_dir / MODEL_STATES)
                fill_expert = _prepare_zero_files(state, non_expert, target, ds_config, tag_dir, stack)
            _walk_experts(state, ep_size, tag_dir, fill_expert)
        if record is not None:
            write_run_record(tag_dir, record)
        if meta.tokenizer is not None:
            copy_tokenizer(meta.tokenizer, tag_dir)

    def write_finished_tag(tag_dir: Path) -> None:
        write_tag(tag_dir)
        if finish is not None:
            finish(tag_dir)

    if dst_dir.is_dir() and any(dst_dir.iterdir()) and not replace:
        with staged_dir(dst_dir / tag) as tmp:
            write_finished_tag(tmp)
        write_text_atomic(dst_dir / "latest", tag)
    else:
        with staged_dir(dst_dir, "replace") as tmp:
            write_finished_tag(tmp / tag)
            (tmp / "latest").write_text(tag)
    return dst_dir / tag


def _check_request(state: CheckpointSource, dst_dir: Path, world_size: int, ep_size: int, ds_config: dict) -> None:
    check_expert_parallel(ep_size, [layer.num_experts for layer in state.moe_layers], world_size)
    zero = ds_config.get("zero_optimization", {})
    stage = zero_stage(ds_config)
    if stage not in (0, 1, 2):
        raise UserError(f"can only write checkpoints without ZeRO or with ZeRO stage 1 or 2, the DeepSpeed config "
                        f"has stage {stage}")
    if (stage == 0) != (state.meta.zero_stage == 0):
        # The two keep different optimizer state (a torch state_dict against flat partitions with a
        # loss scaler), so a conversion would have to invent what one of them lacks.
        raise UserError(f"cannot write a stage-{stage} checkpoint from a stage-{state.meta.zero_stage} one: "
                        f"converting between no ZeRO and ZeRO 1/2 is not supported")
    if zero.get("round_robin_gradients") or zero.get("elastic_checkpoint"):
        raise UserError("zero_optimization.round_robin_gradients and elastic_checkpoint are not supported")
    expected = torch.bfloat16 if bf16_enabled(ds_config) else torch.float32
    if not state.meta.has_optimizer:
        # Module weights only (a stage-0 source, so stage 0 here): DeepSpeed's engine loads them into
        # any precision, so their dtype is their own.
        if state.meta.module_dtype not in (torch.float32, torch.bfloat16):
            raise UserError(f"can write module weights in fp32 or bf16, not {state.meta.module_dtype}")
    elif ds_config.get("fp16", {}).get("enabled") or state.meta.module_dtype != expected:
        raise UserError(f"can write fp32 and bf16 checkpoints whose DeepSpeed config matches the weights "
                        f"(weights {state.meta.module_dtype}, config {'bf16' if bf16_enabled(ds_config) else 'fp32'})")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise UserError(f"output {dst_dir} exists and is not a directory")
    source = state.meta.source
    if source is not None and dst_dir.resolve() in (source.resolve(), source.resolve().parent):
        raise UserError(f"refusing to write into the source checkpoint's directory {dst_dir}")


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
        for name, shape in layer.flat_params(layer.num_experts // ep_size):
            names.append(name)
            shapes[name] = shape
    numels = [shapes[n].numel() for n in names]
    expert = [flat_group(names[c.start:c.stop], numels[c.start:c.stop], world_size // ep_size, element_size, aligned)
              for c in split_moe_group(numels)]
    return _Target(world_size, ep_size, dense, expert, shapes)


def _check_param(name: str, state: ParamState, shape: torch.Size, with_moments: bool) -> None:
    tensors = {"fp32": state.fp32, "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq}
    for key, tensor in tensors.items():
        if key != "fp32" and not with_moments:
            continue
        if tensor is None:
            raise UserError(f"{name}: no {key}, but the optimizer has taken steps")
        if tensor.shape != shape:
            raise UserError(f"{name}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


ExpertFill = Callable[[MoELayer, int, dict[str, ParamState]], None]


def _prepare_zero_files(state: CheckpointSource, non_expert: NonExpertState, target: _Target, ds_config: dict,
                        tag_dir: Path, stack: ExitStack) -> ExpertFill:
    """Every rank's ZeRO optimizer file, saved with its flat partitions as holes and mapped for filling.

    A rank's optimizer file holds its slice of every MoE layer, so building it in memory would
    hold about 1/ep_size of the checkpoint. Instead the non-expert fragments are filled here and
    the returned function fills one expert's fragments in every rank that holds them: memory holds
    the non-expert state and one expert, the filled bytes go straight to the page cache.
    """
    with_moments = state.meta.optimizer_step is not None
    paths = [tag_dir / zero_file(rank, bf16_enabled(ds_config)) for rank in range(target.world_size)]
    for rank, path in enumerate(paths):
        skeleton, holes = _zero_file_skeleton(state, target, rank, ds_config)
        save_skeleton(skeleton, path, holes)
    files = [_RankPartitions(stack.enter_context(open_for_filling(path)), with_moments) for path in paths]
    for index, group in enumerate(target.dense):
        for name in group.names:
            for fragment in group.locate(name):
                files[fragment.partition].fill(index, fragment, non_expert.params[name])
    group_of = {name: len(target.dense) + index for index, group in enumerate(target.expert) for name in group.names}

    def fill_expert(layer: MoELayer, expert: int, params: dict[str, ParamState]) -> None:
        ep_rank, local = divmod(expert, layer.num_experts // target.ep_size)
        for suffix, param in params.items():
            name, start = layer.flat_slot(local, suffix)
            index = group_of[name]
            for fragment in target.groups[index].locate(name, start, param.fp32.numel()):
                # The fragment's partition is an expert-data-parallel rank within this ep_rank.
                files[fragment.partition * target.ep_size + ep_rank].fill(index, fragment, param)

    return fill_expert


class _RankPartitions:
    """One rank's optimizer file, mapped for writing: flat fp32 partitions and Adam moments by group."""

    def __init__(self, saved: dict, with_moments: bool) -> None:
        optimizer = saved[OPTIMIZER_STATE_DICT]
        self.fp32 = optimizer[SINGLE_PARTITION_OF_FP32_GROUPS]
        adam = optimizer[BASE_OPTIMIZER_STATE]["state"]
        self.moments = [adam[index] for index in range(len(self.fp32))] if with_moments else None

    def fill(self, group: int, fragment: Fragment, param: ParamState) -> None:
        targets = [("fp32", self.fp32[group])]
        if self.moments is not None:
            targets += [(key, self.moments[group][key]) for key in MOMENTS]
        for key, flat in targets:
            source = getattr(param, key).reshape(-1).narrow(0, fragment.param_start, fragment.numel)
            flat.narrow(0, fragment.partition_start, fragment.numel).copy_(source)


def _walk_experts(state: CheckpointSource, ep_size: int, tag_dir: Path, fill_expert: ExpertFill) -> None:
    """Every expert once, layer by layer: checked, its optimizer state filled, its module file written."""
    with_moments = state.meta.optimizer_step is not None
    dtype = state.meta.module_dtype
    for layer in state.moe_layers:
        for expert in range(layer.num_experts):
            params = state.expert_state(layer.index, expert)
            if set(params) != set(layer.param_shapes):
                raise UserError(f"{layer.prefix} expert {expert}: parameters {sorted(params)}, "
                                f"expected {list(layer.param_shapes)}")
            for suffix, param in params.items():
                _check_param(layer.param_name(expert, suffix), param, torch.Size(layer.param_shapes[suffix]),
                             with_moments)
            fill_expert(layer, expert, params)
            # copy=True: torch.save of a view would store its whole storage.
            module = {layer.param_name(expert, s): p.fp32.to(dtype, copy=True) for s, p in params.items()}
            save_file(module, tag_dir / expert_file(layer.index, expert))


def _zero_file_skeleton(state: CheckpointSource, target: _Target, rank: int,
                        ds_config: dict) -> tuple[dict, list[torch.Tensor]]:
    """One rank's zero_pp_rank_*_optim_states.pt, as DeepSpeedZeroOptimizer.state_dict() lays it out.

    Returns the file's structure with uninitialised flat partitions and the list of them (the holes).
    """
    meta = state.meta
    dense_count = len(meta.dense_groups)
    expert_dp_rank, ep_rank = divmod(rank, target.ep_size)
    layouts = [(g, rank) for g in target.dense] + [(g, expert_dp_rank) for g in target.expert]
    adam_state, param_groups, holes, fp32 = {}, [], [], []
    for index, (layout, partition) in enumerate(layouts):
        # DeepSpeed saves the fp32 partition without its trailing padding, the moments with it.
        fp32.append(torch.empty(layout.partition_size - layout.group_padding(partition), dtype=torch.float32))
        holes.append(fp32[-1])
        if meta.optimizer_step is not None:
            moments = {key: torch.empty(layout.partition_size, dtype=torch.float32) for key in MOMENTS}
            adam_state[index] = {"step": meta.optimizer_step.clone(), **moments}
            holes += moments.values()
        if index < dense_count:
            hypers = meta.dense_groups[index].hypers
        else:
            hypers = {**meta.expert_hypers, "name": f"ep_size_{target.ep_size}", "moe": True}
        param_groups.append({**hypers, "params": [index]})
    optimizer = {
        **meta.optimizer_extras,
        BASE_OPTIMIZER_STATE: {"state": adam_state, "param_groups": param_groups},
        SINGLE_PARTITION_OF_FP32_GROUPS: fp32,
        ZERO_STAGE: ZeroStageEnum(zero_stage(ds_config)),
        GROUP_PADDINGS: [layout.group_padding(partition) for layout, partition in layouts],
        PARAM_ALIGNMENT_PADDINGS: [list(layout.paddings) for layout, _ in layouts],
        PARTITION_COUNT: [layout.dp_size for layout, _ in layouts],
        DS_VERSION: deepspeed.__version__,
        PARAM_SLICE_MAPPINGS: [OrderedDict((f.name, fragment_address(numel=f.numel, start=f.partition_start))
                                           for f in layout.fragments(partition)) for layout, partition in layouts],
    }
    return {OPTIMIZER_STATE_DICT: optimizer, "ds_config": ds_config, DS_VERSION: deepspeed.__version__}, holes


def _model_file_state(state: CheckpointSource, non_expert: NonExpertState, target: _Target, ds_config: dict) -> dict:
    """mp_rank_00_model_states.pt: non-expert weights and buffers, layout, training progress, client state.

    Without ZeRO, DeepSpeed stores no parameter shapes and puts the optimizer state in this file
    (stage0.py adds it).
    """
    meta = state.meta
    if set(non_expert.buffers) != set(meta.buffer_names):
        raise UserError(f"the state's buffers {sorted(non_expert.buffers)} differ from the source's "
                        f"{sorted(meta.buffer_names)}")
    module = OrderedDict()
    for key in meta.module_keys:
        if key in non_expert.params:
            module[key] = _alone(non_expert.params[key].fp32.to(meta.module_dtype))
        elif key in non_expert.buffers:
            module[key] = _alone(non_expert.buffers[key])
        elif key in meta.module_aliases or key in meta.shared_params:
            module[key] = None  # filled below, keeping the key's place
    for alias, holder in meta.module_aliases.items():
        module[alias] = module[holder].clone()
    for alias, holder in meta.shared_params.items():
        module[alias] = module[holder].clone()  # DeepSpeed clones every tensor before saving
    extras = meta.model_extras
    stage = zero_stage(ds_config)
    # ZeRO-2 records frozen parameters (none here: the reader refuses them), ZeRO-1 does not.
    frozen = OrderedDict() if stage == 2 else None
    checkpoint = {
        "module": module,
        "buffer_names": list(meta.buffer_names),
        "optimizer": None,
        # As DeepSpeed records it on rank 0: experts under the local ids of ep_rank 0, shapes as tuples.
        "param_shapes": [OrderedDict((n, tuple(target.shapes[n])) for n in g.names) for g in target.groups]
        if stage else None,
        "frozen_param_shapes": frozen,
        "shared_params": dict(meta.shared_params) if stage else None,
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
    if any(layer.autoep for layer in state.moe_layers):
        checkpoint.update(autoep_model_entries(state.moe_layers, target.ep_size, target.world_size,
                                               extras.get("universal_checkpoint_info")))
    return checkpoint



def _alone(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as DeepSpeed saves it, with a storage of its own: itself when it already owns exactly
    its storage (a fresh fp32 state: no second copy of the non-expert weights in memory), else a copy
    (torch.save writes a view's whole storage)."""
    owns = (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
    return tensor if owns else tensor.clone()
