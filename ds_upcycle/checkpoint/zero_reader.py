"""Read a DeepSpeed ZeRO-1/2 MoE checkpoint of any layout into layout-independent state.

The reader opens every file memory-mapped and assembles a parameter only when asked, so a caller
that walks the MoE layers one at a time holds one layer's worth of tensors, not the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, CLIP_GRAD, DS_VERSION, GROUP_PADDINGS,
                                            LOSS_SCALER, OPTIMIZER_STATE_DICT, PARAM_ALIGNMENT_PADDINGS,
                                            PARAM_SLICE_MAPPINGS, PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS,
                                            ZERO_STAGE)

from ..errors import UserError
from .autoep import autoep_layers, check_router, is_autoep, module_aliases
from .files import load_file
from .layout import FlatGroup
from .model_file import agreed_step, check_module_keys, common_meta
from .names import ZERO_FILE, expert_file, split_autoep_fused_param, split_expert_param, zero_file
from .state import CheckpointMeta, MoELayer, NonExpertState, ParamGroup, ParamState

ADAM_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq"}
OPTIMIZER_EXTRAS = (LOSS_SCALER, "dynamic_loss_scale", "overflow", CLIP_GRAD)


@dataclass
class _Group:
    """One optimizer parameter group of the checkpoint."""

    index: int
    is_moe: bool
    layout: FlatGroup
    hypers: dict
    shapes: dict[str, torch.Size]


class ZeroReader:
    """Lazy, layout-independent view of a DeepSpeed ZeRO-1/2 checkpoint (a state.CheckpointReader)."""

    def __init__(self, tag_dir: Path, model: dict) -> None:
        self.path = tag_dir
        self._module = model["module"]
        world = model["dp_world_size"]
        self._zero = _load_zero_files(self.path, world)
        _check_ranks_agree(self._zero, model[DS_VERSION], self.path)
        self._groups = _read_groups(model, self._zero[0], world, self.path)
        self._group_of = {name: g.index for g in self._groups for name in g.layout.names}
        self._shapes = {name: shape for g in self._groups for name, shape in g.shapes.items()}
        self.ep_size = _ep_size(self._groups, world, self.path)
        self.world_size = world
        _check_partitions(self._zero, self._groups, self.ep_size, self.path)
        if is_autoep(model):
            fused = {name: shape for g in self._groups if g.is_moe for name, shape in g.shapes.items()}
            self.moe_layers = autoep_layers(model, fused, self.ep_size, self.path)
            _check_fused_names(self._groups, self.moe_layers, self.path)
        else:
            self.moe_layers = _moe_layers(self._groups, model.get("num_experts"), self.ep_size, self.path)
        self._check_expert_files()
        self.meta = self._meta(model)

    # -- CheckpointReader -------------------------------------------------------------------------

    @property
    def num_experts(self) -> list[int]:
        return [layer.num_experts for layer in self.moe_layers]

    def non_expert_state(self) -> NonExpertState:
        params = {name: self._gather(name, 0, range(self.world_size), self._shapes[name])
                  for group in self._groups if not group.is_moe for name in group.layout.names}
        buffers = {name: self._module[name].clone() for name in self.meta.buffer_names}
        return NonExpertState(params, buffers)

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        moe = self.moe_layers[layer]
        moe.check_expert(expert)
        local_count = moe.num_experts // self.ep_size
        ep_rank, local = divmod(expert, local_count)
        # The expert's data-parallel group: ranks with the same ep_rank, in expert-data-parallel order.
        ranks = range(ep_rank, self.world_size, self.ep_size)
        self._check_expert_file(moe, expert)
        return {suffix: self._gather(*moe.flat_slot(local, suffix), ranks, shape)
                for suffix, shape in moe.param_shapes.items()}

    # -- assembling parameters --------------------------------------------------------------------

    def _gather(self, name: str, start: int, ranks: range, shape: torch.Size) -> ParamState:
        """Concatenate the fragments of a parameter's elements from `start` on (`shape` of them) from
        the partitions of `ranks` (the group's ranks in order)."""
        group = self._groups[self._group_of[name]]
        fragments = group.layout.locate(name, start, math.prod(shape))

        def assemble(tensor_of_rank) -> torch.Tensor:
            pieces = [tensor_of_rank(ranks[f.partition]).narrow(0, f.partition_start, f.numel) for f in fragments]
            return torch.cat(pieces).view(shape)

        fp32 = assemble(lambda rank: self._zero[rank][SINGLE_PARTITION_OF_FP32_GROUPS][group.index])
        if self.meta.optimizer_step is None:
            return ParamState(fp32)
        moments = [assemble(lambda rank, key=key: _adam_state(self._zero[rank], group.index)[key])
                   for key in ("exp_avg", "exp_avg_sq")]
        return ParamState(fp32, *moments)

    # -- metadata and checks ----------------------------------------------------------------------

    def _meta(self, model: dict) -> CheckpointMeta:
        dense = [g for g in self._groups if not g.is_moe]
        moe = [g for g in self._groups if g.is_moe]
        expert_hypers = moe[0].hypers if moe else None
        if any(g.hypers != expert_hypers for g in moe):
            raise UserError(f"{self.path}: expert parameter groups with different hyperparameters are not supported")
        buffer_names = list(model["buffer_names"] or [])
        module_keys = list(self._module)
        shared = dict(model.get("shared_params") or {})
        dense_names = [n for g in dense for n in g.layout.names]
        aliases = {}
        if is_autoep(model):
            check_router(self.moe_layers, dense_names, buffer_names, self.path)
            aliases = module_aliases(module_keys, self.moe_layers, dense_names, buffer_names, self._module, self.path)
        check_module_keys(module_keys, dense_names, buffer_names, {**shared, **aliases}, self.path)
        first = self._zero[0]
        return CheckpointMeta(
            **common_meta(model, self.path), zero_stage=int(first[ZERO_STAGE]),
            dp_world_size=self.world_size, ep_size=self.ep_size,
            module_dtype=self._module[dense[0].layout.names[0]].dtype if dense else torch.float32,
            optimizer_step=agreed_step([_adam_state(first, g.index).get("step") for g in self._groups], self.path),
            dense_groups=[ParamGroup(dict(g.hypers), list(g.layout.names)) for g in dense],
            expert_hypers=dict(expert_hypers) if expert_hypers is not None else None,
            optimizer_extras={k: first[k] for k in OPTIMIZER_EXTRAS if k in first},
            module_keys=module_keys, buffer_names=buffer_names, shared_params=shared, module_aliases=aliases)

    def _check_expert_files(self) -> None:
        missing = [expert_file(layer.index, e) for layer in self.moe_layers for e in range(layer.num_experts)
                   if not (self.path / expert_file(layer.index, e)).is_file()]
        if missing:
            raise UserError(f"{self.path}: {len(missing)} expert file(s) missing, e.g. {missing[0]}")

    def _check_expert_file(self, moe: MoELayer, expert: int) -> None:
        path = self.path / expert_file(moe.index, expert)
        saved = load_file(path, mmap=True)
        expected = {moe.param_name(expert, suffix) for suffix in moe.param_shapes}
        if set(saved) != expected:
            raise UserError(f"{path}: holds {sorted(saved)[:2]}..., expected the parameters of expert {expert} "
                            f"of {moe.prefix}")


def _uses_bf16_files(tag_dir: Path) -> bool:
    """bf16 runs name their optimizer files bf16_zero_pp_rank_*; the content is the same format."""
    kinds = {bool(m["bf16"]) for p in tag_dir.iterdir() if (m := ZERO_FILE.match(p.name))}
    if len(kinds) > 1:
        raise UserError(f"{tag_dir} mixes bf16_zero_pp_rank_* and zero_pp_rank_* optimizer files")
    return kinds == {True}


def _load_zero_files(tag_dir: Path, world: int) -> list[dict]:
    bf16 = _uses_bf16_files(tag_dir)
    present = {int(m["rank"]) for p in tag_dir.iterdir() if (m := ZERO_FILE.match(p.name)) and bool(m["bf16"]) == bf16}
    missing = sorted(set(range(world)) - present)
    if missing:
        raise UserError(f"{tag_dir}: ZeRO optimizer files missing for rank(s) {', '.join(map(str, missing))} "
                        f"of {world} (dp_world_size)")
    extra = sorted(present - set(range(world)))
    if extra:
        raise UserError(f"{tag_dir}: ZeRO optimizer files for rank(s) {', '.join(map(str, extra))}, beyond "
                        f"dp_world_size {world}")
    files = []
    for rank in range(world):
        saved = load_file(tag_dir / zero_file(rank, bf16), mmap=True)
        state = saved.get(OPTIMIZER_STATE_DICT) if isinstance(saved, dict) else None
        if not isinstance(state, dict) or SINGLE_PARTITION_OF_FP32_GROUPS not in state:
            kind = " (DeepSpeed's BF16_Optimizer format, not supported yet)" if bf16 else ""
            raise UserError(f"{tag_dir / zero_file(rank, bf16)} is not a ZeRO-1/2 optimizer file{kind}")
        if not isinstance(state.get(BASE_OPTIMIZER_STATE), dict):
            raise UserError(f"{tag_dir}: elastic ZeRO checkpoints (zero_optimization.elastic_checkpoint) "
                            f"are not supported")
        files.append(state)
    return files


def _summary(state: dict) -> dict:
    """What every rank's optimizer file must agree on."""
    base = state[BASE_OPTIMIZER_STATE]
    return {"ds_version": state.get(DS_VERSION), "zero_stage": int(state[ZERO_STAGE]),
            "partition_count": list(state[PARTITION_COUNT]),
            "param_alignment_paddings": state.get(PARAM_ALIGNMENT_PADDINGS),
            "groups": len(state[SINGLE_PARTITION_OF_FP32_GROUPS]),
            "hyperparameters": [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]],
            "step": [float(s["step"]) for s in base["state"].values() if "step" in s]}


def _check_ranks_agree(zero: list[dict], model_version: str, tag_dir: Path) -> None:
    reference = _summary(zero[0])
    for rank, state in enumerate(zero[1:], start=1):
        for key, value in _summary(state).items():
            if value != reference[key]:
                raise UserError(f"{tag_dir}: ranks disagree on {key} ({zero_file(0)}: {reference[key]}, "
                                f"{zero_file(rank)}: {value}); the checkpoint mixes files of different runs")
    if reference["ds_version"] != model_version:
        raise UserError(f"{tag_dir}: optimizer files were written by DeepSpeed {reference['ds_version']}, "
                        f"the model file by {model_version}")
    if reference["zero_stage"] not in (1, 2):
        raise UserError(f"{tag_dir}: ZeRO stage {reference['zero_stage']} is not supported (only 1 and 2)")


def _read_groups(model: dict, first: dict, world: int, tag_dir: Path) -> list[_Group]:
    shapes, counts = model["param_shapes"], first[PARTITION_COUNT]
    hypers = first[BASE_OPTIMIZER_STATE]["param_groups"]
    paddings = first.get(PARAM_ALIGNMENT_PADDINGS) or [[0] * len(s) for s in shapes]
    if not len(shapes) == len(counts) == len(hypers) == len(paddings):
        raise UserError(f"{tag_dir}: the model file lists {len(shapes)} parameter groups, the optimizer files "
                        f"{len(counts)}")
    groups = []
    for index, (group_shapes, count, group_hypers, group_paddings) in enumerate(zip(shapes, counts, hypers, paddings)):
        names = list(group_shapes)
        is_moe = bool(group_hypers.get("moe", False))
        if any(_is_expert_name(n) != is_moe for n in names):
            raise UserError(f"{tag_dir}: optimizer group {index} mixes expert and non-expert parameters")
        if not is_moe and count != world:
            raise UserError(f"{tag_dir}: group {index} is partitioned {count} ways, dp_world_size is {world}")
        layout = FlatGroup(tuple(names), tuple(math.prod(group_shapes[n]) for n in names), tuple(group_paddings), count)
        groups.append(_Group(index, is_moe, layout, {k: v for k, v in group_hypers.items() if k != "params"},
                             {n: torch.Size(group_shapes[n]) for n in names}))
    return groups


def _is_expert_name(name: str) -> bool:
    return split_expert_param(name) is not None or split_autoep_fused_param(name) is not None


def _check_fused_names(groups: list[_Group], layers: list[MoELayer], tag_dir: Path) -> None:
    """The expert groups hold the fused weights of the AutoEP layers, no more and no less."""
    expected = {name for layer in layers for name, _ in layer.flat_params(1)}
    saved = {name for g in groups if g.is_moe for name in g.layout.names}
    if saved != expected:
        example = min(saved ^ expected)
        raise UserError(f"{tag_dir}: expert parameter {example} is {'not' if example in saved else 'missing from'} "
                        f"the fused weights of the AutoEP layers in ds_autoep_layers")


def _ep_size(groups: list[_Group], world: int, tag_dir: Path) -> int:
    counts = {g.layout.dp_size for g in groups if g.is_moe}
    if not counts:
        return 1
    if len(counts) > 1 or world % min(counts):
        raise UserError(f"{tag_dir}: expert groups partitioned {sorted(counts)} ways do not fit dp_world_size {world}")
    ep_size = world // counts.pop()
    names = {g.hypers.get("name") for g in groups if g.is_moe}
    if names != {f"ep_size_{ep_size}"}:
        raise UserError(f"{tag_dir}: expert groups {sorted(map(str, names))} do not match ep_size {ep_size} implied "
                        f"by their partitioning")
    return ep_size


def _check_partitions(zero: list[dict], groups: list[_Group], ep_size: int, tag_dir: Path) -> None:
    """Every rank's flat partitions must have the sizes and parameter slices DeepSpeed's rules give."""
    for rank, state in enumerate(zero):
        for group in groups:
            partition = rank // ep_size if group.is_moe else rank
            layout = group.layout
            fp32 = state[SINGLE_PARTITION_OF_FP32_GROUPS][group.index]
            expected = layout.partition_size - layout.group_padding(partition)
            moments = [t for k, t in _adam_state(state, group.index).items() if k != "step"]
            problem = None
            if fp32.dim() != 1 or fp32.numel() != expected:
                problem = f"fp32 partition has {fp32.numel()} elements, expected {expected}"
            elif state[GROUP_PADDINGS][group.index] != layout.group_padding(partition):
                problem = "group padding differs"
            elif any(t.numel() != layout.partition_size for t in moments):
                problem = "Adam state size differs from the partition size"
            elif PARAM_SLICE_MAPPINGS in state:
                saved = {name: (a.start, a.numel) for name, a in state[PARAM_SLICE_MAPPINGS][group.index].items()}
                ours = {f.name: (f.partition_start, f.numel) for f in layout.fragments(partition)}
                if saved != ours:
                    problem = "parameter slices differ"
            if problem:
                raise UserError(f"{tag_dir / zero_file(rank)}: group {group.index}: {problem} from DeepSpeed's "
                                f"ZeRO-1/2 layout (corrupt file, or an unsupported setting such as "
                                f"round_robin_gradients)")
            extra = set(_adam_state(state, group.index)) - ADAM_STATE_KEYS
            if extra:
                raise UserError(f"{tag_dir}: optimizer state {sorted(extra)} is not supported; only Adam/AdamW "
                                f"(exp_avg, exp_avg_sq, step)")


def _adam_state(state: dict, group_index: int) -> dict:
    base = state[BASE_OPTIMIZER_STATE]
    param_id = base["param_groups"][group_index]["params"][0]
    return base["state"].get(param_id, {})


def _moe_layers(groups: list[_Group], num_experts: list[int] | None, ep_size: int, tag_dir: Path) -> list[MoELayer]:
    """MoE layers in module order, from the expert groups' (local) parameter names."""
    shapes: dict[str, dict[int, dict[str, torch.Size]]] = {}
    for group in groups:
        if not group.is_moe:
            continue
        for name, shape in group.shapes.items():
            if split_expert_param(name) is None:
                raise UserError(f"{tag_dir}: expert parameter {name} is an AutoEP layer's fused weight, but the "
                                f"model file has no ds_autoep_layers entry describing the AutoEP layers")
            prefix, local, suffix = split_expert_param(name)
            shapes.setdefault(prefix, {}).setdefault(local, {})[suffix] = shape
    if not shapes:
        return []
    if not isinstance(num_experts, list) or len(num_experts) != len(shapes):
        raise UserError(f"{tag_dir}: num_experts {num_experts} does not match the {len(shapes)} MoE layers "
                        f"in the optimizer groups")
    layers = []
    for index, ((prefix, experts), count) in enumerate(zip(shapes.items(), num_experts)):
        local_ids = sorted(experts)
        if local_ids != list(range(len(local_ids))) or count != len(local_ids) * ep_size:
            raise UserError(f"{tag_dir}: {prefix} has local experts {local_ids} with ep_size {ep_size}, "
                            f"but num_experts {count}")
        if any(experts[i] != experts[0] for i in local_ids):
            raise UserError(f"{tag_dir}: experts of {prefix} do not all have the same parameters")
        layers.append(MoELayer(index, prefix, count, dict(experts[0])))
    return layers
