"""DeepSpeed MoE checkpoints saved without ZeRO (stage 0): read them, and write them for any layout.

Two kinds: a run's (with its torch optimizer, below), and module weights only, as DeepSpeed saves
an engine built without an optimizer (every optimizer entry None; the weights in fp32 or bf16, and
they are the master weights). ds-upcycle's imports are of the second kind: a release has no
optimizer state, so its weights are written once, in its own dtype, and load on any layout.

Without ZeRO, DeepSpeed (0.19.8) saves the torch optimizer's own `state_dict()`: every
expert-parallel rank p writes `expp_rank_{p}_mp_rank_00_optim_states.pt` = {"optimizer": ...}
(the non-expert parameters' state, the same on every rank, and the state of p's local experts),
and rank 0's is stored again under "optimizer" in the model file. The module weights are the fp32
master weights. The state is keyed by parameter index and the checkpoint records no parameter
names (`param_shapes` is None), so names are recovered from the layout DeepSpeed gives the
optimizer when the script passes `model.parameters()`: one group of the non-expert parameters in
module order, then the expert groups of split_params_into_different_moe_groups_for_optimizer
(local experts in module order, cut by size). A checkpoint whose groups do not fit that layout
is refused rather than guessed at.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

import torch

from ..config import check_expert_parallel
from ..errors import UserError
from .autoep import autoep_layers, check_router, is_autoep
from .files import load_file, open_for_filling, save_file, save_skeleton
from .layout import split_moe_group
from .model_file import agreed_step, check_module_keys, common_meta
from .names import (AUTOEP_EXPERT_WEIGHTS, MODEL_STATES, autoep_expert_param, autoep_fused_param, expert_file,
                    split_expert_param)
from .state import MOMENTS, CheckpointMeta, CheckpointSource, MoELayer, NonExpertState, ParamGroup, ParamState

OPTIM_FILE = re.compile(r"^expp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")


def optim_file(ep_rank: int) -> str:
    return f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


class Stage0Reader:
    """Lazy, layout-independent view of a stage-0 MoE checkpoint (a state.CheckpointReader)."""

    def __init__(self, path: Path, model: dict) -> None:
        self.path = path
        self._module = model["module"]
        dtypes = {t.dtype for name, t in self._module.items() if t.is_floating_point()
                  and name not in (model["buffer_names"] or [])}
        if model.get("optimizer") is not None and dtypes - {torch.float32}:
            raise UserError(f"{path}: {', '.join(sorted(map(str, dtypes)))} weights without ZeRO are saved by "
                            f"DeepSpeed's mixed-precision optimizer wrappers, which are not supported; use ZeRO "
                            f"stage 1 or 2")
        self.world_size = int(model["dp_world_size"])
        self.ep_size = _ep_size(path, self.world_size)
        self._optim = [_load_optimizer(path / optim_file(p)) for p in range(self.ep_size)]
        self.module_only = _module_only(path, model, self._optim)
        module_dtype = _module_dtype(path, dtypes) if self.module_only else torch.float32
        self.moe_layers = _moe_layers(path, model, self.ep_size)
        buffer_names = list(model["buffer_names"] or [])
        groups = [] if self.module_only else self._optim[0]["param_groups"]
        aliases = _aliases(self._module, buffer_names, None if self.module_only else
                           len(groups[0]["params"]) if groups else 0)
        dense_names = [k for k in self._module if k not in buffer_names and k not in aliases]
        if is_autoep(model):
            check_router(self.moe_layers, dense_names, buffer_names, path)
        self._expert_index = {name: i for i, (name, _) in enumerate(self._local_expert_params())}
        if self.module_only:  # no optimizer state to index: every moment reads as None
            self._dense_index = {name: index for index, name in enumerate(dense_names)}
            step, dense_hypers, expert_hypers = None, {}, None
        else:
            self._dense_index = _check_groups(path, groups, dense_names, self._local_expert_numels(), self._optim)
            step = agreed_step([entry.get("step") for optim in self._optim for entry in optim["state"].values()],
                               path)
            dense_hypers = {k: v for k, v in groups[0].items() if k != "params"}
            expert_hypers = {k: v for k, v in groups[1].items() if k != "params"} if len(groups) > 1 else None
        check_module_keys(list(self._module), dense_names, buffer_names, aliases, path)
        self.meta = CheckpointMeta(
            **common_meta(model, path), zero_stage=0, dp_world_size=self.world_size, ep_size=self.ep_size,
            module_dtype=module_dtype,
            optimizer_step=step, dense_groups=[ParamGroup(dense_hypers, dense_names)],
            expert_hypers=expert_hypers, optimizer_extras={},
            module_keys=list(self._module), buffer_names=buffer_names, shared_params=aliases,
            has_optimizer=not self.module_only)

    @property
    def num_experts(self) -> list[int]:
        return [layer.num_experts for layer in self.moe_layers]

    def _local_expert_params(self) -> list[tuple[str, torch.Size]]:
        """One ep rank's expert parameters in the optimizer's order (MoELayer.flat_params of every layer)."""
        return [param for layer in self.moe_layers for param in layer.flat_params(layer.num_experts // self.ep_size)]

    def _local_expert_numels(self) -> list[int]:
        return [shape.numel() for _, shape in self._local_expert_params()]

    def non_expert_state(self) -> NonExpertState:
        state = {} if self.module_only else self._optim[0]["state"]
        # float(): module-only weights may be bf16; with an optimizer they are fp32 already (no copy).
        params = {name: ParamState(self._module[name].float(), *_moments(state, index))
                  for name, index in self._dense_index.items()}
        buffers = {name: self._module[name].clone() for name in self.meta.buffer_names}
        return NonExpertState(params, buffers)

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        moe = self.moe_layers[layer]
        moe.check_expert(expert)
        ep_rank, local = divmod(expert, moe.num_experts // self.ep_size)
        weights = load_file(self.path / expert_file(layer, expert), mmap=True)
        state = {} if self.module_only else self._optim[ep_rank]["state"]
        result = {}
        for suffix, shape in moe.param_shapes.items():
            name = moe.param_name(expert, suffix)
            if name not in weights:
                raise UserError(f"{self.path / expert_file(layer, expert)}: no {name}")
            flat, start = moe.flat_slot(local, suffix)
            moments = _moments(state, len(self._dense_index) + self._expert_index[flat])
            result[suffix] = ParamState(weights[name].float(),
                                        *(None if t is None else _slot(t, start, shape) for t in moments))
        return result


def _ep_size(path: Path, world: int) -> int:
    ranks = sorted(int(m["rank"]) for p in path.iterdir() if (m := OPTIM_FILE.match(p.name)))
    if not ranks:
        raise UserError(f"{path}: no expp_rank_*_optim_states.pt files (a stage-0 MoE checkpoint has one per "
                        f"expert-parallel rank)")
    if ranks != list(range(len(ranks))) or world % len(ranks):
        raise UserError(f"{path}: optimizer files for expert-parallel ranks {ranks} do not fit dp_world_size {world}")
    return len(ranks)


def _load_optimizer(path: Path) -> dict | None:
    """The torch optimizer state_dict of an expp_rank file; None when the engine had no optimizer."""
    saved = load_file(path, mmap=True)
    if isinstance(saved, dict) and "optimizer" in saved and saved["optimizer"] is None:
        return None
    optimizer = saved.get("optimizer") if isinstance(saved, dict) else None
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise UserError(f"{path} is not a stage-0 optimizer file (no torch optimizer state_dict)")
    return optimizer


def _module_only(path: Path, model: dict, optims: list[dict | None]) -> bool:
    """Saved by an engine without an optimizer: no expp_rank file and no model-file copy holds one."""
    missing = [optim is None for optim in optims]
    if any(missing) and not all(missing):
        raise UserError(f"{path}: some expp_rank optimizer files hold an optimizer state and some none")
    if all(missing) and model.get("optimizer") is not None:
        raise UserError(f"{path}: the model file holds an optimizer state but the expp_rank files none")
    return all(missing)


def _module_dtype(path: Path, dtypes: set[torch.dtype]) -> torch.dtype:
    """The one dtype of a checkpoint's module weights when it has no optimizer."""
    if len(dtypes) > 1 or dtypes - {torch.float32, torch.bfloat16}:
        raise UserError(f"{path}: module weights in {', '.join(sorted(map(str, dtypes)))}; a checkpoint without "
                        f"an optimizer is read in fp32 or bf16, one dtype")
    return next(iter(dtypes), torch.float32)


def _slot(tensor: torch.Tensor, start: int, shape: torch.Size) -> torch.Tensor:
    """One expert's part of an optimizer tensor (all of it for a legacy expert, a slice of a fused one)."""
    return tensor.reshape(-1).narrow(0, start, shape.numel()).view(shape)


def _moe_layers(path: Path, model: dict, ep_size: int) -> list[MoELayer]:
    """MoE layers from the per-expert files of expert 0 (names and shapes of one expert's parameters)."""
    num_experts = model.get("num_experts")
    if not isinstance(num_experts, list) or not num_experts:
        raise UserError(f"{path} has no MoE layers (num_experts {num_experts})")
    try:
        check_expert_parallel(ep_size, num_experts)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if is_autoep(model):
        return _autoep_layers(path, model, ep_size)
    layers = []
    for index, count in enumerate(num_experts):
        file = path / expert_file(index, 0)
        saved = load_file(file, mmap=True)
        split = [split_expert_param(name) for name in saved]
        if not split or any(s is None or s[1] != 0 for s in split) or len({s[0] for s in split}) != 1:
            raise UserError(f"{file}: does not hold the parameters of expert 0 of one MoE layer")
        prefix = split[0][0]
        layers.append(MoELayer(index, prefix, count, {s[2]: saved[n].shape for n, s in zip(saved, split)}))
    return layers


def _autoep_layers(path: Path, model: dict, ep_size: int) -> list[MoELayer]:
    """AutoEP layers; the fused parameters' shapes, which a stage-0 file does not record, from expert 0's file."""
    shapes = {}
    for entry in model["ds_autoep_layers"]:
        prefix, index = entry.get("module_path"), entry.get("moe_layer_id")
        saved = load_file(path / expert_file(index, 0), mmap=True) if isinstance(index, int) else {}
        for weight in AUTOEP_EXPERT_WEIGHTS:
            tensor = saved.get(autoep_expert_param(prefix, 0, weight))
            if tensor is not None:
                shapes[autoep_fused_param(prefix, weight)] = torch.Size((entry["num_experts"] // ep_size,
                                                                         *tensor.shape))
    return autoep_layers(model, shapes, ep_size, path)


def _aliases(module: dict, buffer_names: list[str], num_params: int | None) -> dict[str, str]:
    """Tied parameters: keys whose tensor is an earlier key's (named_parameters keeps the first).

    A tie shows as shared storage where the file kept it. DeepSpeed's stage-0 save clones every
    tensor, so there a tie shows only as equal values: that reading is used when shared storage
    does not account for the optimizer's `num_params` non-expert parameters, and only if it does.
    Without an optimizer (num_params None) nothing counts the parameters: a tie the file does not
    show stays two keys of equal weights, which is what the module loads either way.
    """
    names = [name for name in module if name not in buffer_names]

    def tied(same) -> dict[str, str]:
        aliases = {}
        for index, name in enumerate(names):
            holder = next((earlier for earlier in names[:index] if earlier not in aliases
                           and same(module[earlier], module[name])), None)
            if holder is not None:
                aliases[name] = holder
        return aliases

    def shared(a: torch.Tensor, b: torch.Tensor) -> bool:
        return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and a.storage_offset() == b.storage_offset() and a.shape == b.shape)

    def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

    aliases = tied(shared)
    if num_params is not None and len(names) - len(aliases) != num_params:
        by_value = tied(equal)
        if len(names) - len(by_value) == num_params:
            return by_value
    return aliases


def _check_groups(path: Path, groups: list[dict], dense_names: list[str], expert_numels: list[int],
                  optims: list[dict]) -> dict[str, int]:
    """The optimizer's groups must be the layout DeepSpeed builds from model.parameters(); dense name -> index."""
    explain = ("stage-0 checkpoints record no parameter names, so ds-upcycle supports the optimizer layout "
               "DeepSpeed builds from model.parameters(): one non-expert group, then the expert groups")
    sizes = [len(g["params"]) for g in groups]
    moe = [bool(g.get("moe", False)) for g in groups]
    if not groups or moe[0] or not all(moe[1:]) or sizes[0] != len(dense_names):
        raise UserError(f"{path}: optimizer groups of sizes {sizes} (expert groups: {moe}) for {len(dense_names)} "
                        f"non-expert parameters; {explain}")
    if sizes[1:] != [len(chunk) for chunk in split_moe_group(expert_numels)]:
        raise UserError(f"{path}: expert groups of sizes {sizes[1:]} for {len(expert_numels)} expert parameters "
                        f"per expert-parallel rank; {explain}")
    flat = [i for g in groups for i in g["params"]]
    if flat != list(range(len(flat))):
        raise UserError(f"{path}: optimizer parameter indices are not in group order; {explain}")
    for rank, optim in enumerate(optims):
        if [len(g["params"]) for g in optim["param_groups"]] != sizes:
            raise UserError(f"{path}: {optim_file(rank)} has other optimizer groups than {optim_file(0)}")
    return {name: index for index, name in enumerate(dense_names)}


def _moments(state: dict, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    entry = state.get(index)
    if entry is None:
        return None, None
    extra = set(entry) - {"step", *MOMENTS}
    if extra:
        raise UserError(f"optimizer state {sorted(extra)} is not supported; only Adam/AdamW (exp_avg, exp_avg_sq)")
    return entry["exp_avg"], entry["exp_avg_sq"]


# -- writing -----------------------------------------------------------------------------------

def prepare_stage0_files(state: CheckpointSource, non_expert: NonExpertState, ep_size: int, tag_dir: Path,
                         model_file: dict, stack: ExitStack):
    """Save every expp_rank optimizer file and the model file (with rank 0's optimizer state) for ep_size.

    As for ZeRO files, the moments are saved as holes, mapped, and filled: the non-expert ones
    here, an expert's by the returned function (called once per expert, in any order), so memory
    holds the non-expert state and one expert.
    """
    meta = state.meta
    paths = [tag_dir / optim_file(p) for p in range(ep_size)]
    if not meta.has_optimizer:  # as DeepSpeed saves an engine without one
        for path in paths:
            save_file({"optimizer": None}, path)
        save_file(model_file, tag_dir / MODEL_STATES)
        return lambda layer, expert, params: None
    with_moments = meta.optimizer_step is not None
    dense = meta.dense_groups[0].names if meta.dense_groups else []
    # Expert parameters of one ep rank in the optimizer's order (MoELayer.flat_params of every layer).
    local = [param for layer in state.moe_layers for param in layer.flat_params(layer.num_experts // ep_size)]
    index_of = {name: len(dense) + i for i, (name, _) in enumerate(local)}
    shapes = [non_expert.params[n].fp32.shape for n in dense] + [shape for _, shape in local]
    chunks = split_moe_group([shape.numel() for shape in shapes[len(dense):]])

    def optimizer_skeleton() -> tuple[dict, list[torch.Tensor]]:
        adam, holes = {}, []
        if with_moments:
            for index, shape in enumerate(shapes):
                moments = {key: torch.empty(shape, dtype=torch.float32) for key in MOMENTS}
                adam[index] = {"step": meta.optimizer_step.clone(), **moments}
                holes += moments.values()
        groups = [{**meta.dense_groups[0].hypers, "params": list(range(len(dense)))}]
        for chunk in chunks:
            hypers = {**meta.expert_hypers, "name": f"ep_size_{ep_size}", "moe": True}
            groups.append({**hypers, "params": [len(dense) + i for i in chunk]})
        return {"state": adam, "param_groups": groups}, holes

    for path in paths:
        optimizer, holes = optimizer_skeleton()
        save_skeleton({"optimizer": optimizer}, path, holes)
    optimizer, holes = optimizer_skeleton()
    save_skeleton({**model_file, "optimizer": optimizer}, tag_dir / MODEL_STATES, holes)
    if not with_moments:
        return lambda layer, expert, params: None
    ranks = [stack.enter_context(open_for_filling(path))["optimizer"]["state"] for path in paths]
    rank0_copy = stack.enter_context(open_for_filling(tag_dir / MODEL_STATES))["optimizer"]["state"]
    for index, name in enumerate(dense):
        for target in (*ranks, rank0_copy):
            _fill(target[index], non_expert.params[name])

    def fill_expert(layer: MoELayer, expert: int, params: dict[str, ParamState]) -> None:
        ep_rank, local_id = divmod(expert, layer.num_experts // ep_size)
        targets = [ranks[ep_rank]] + ([rank0_copy] if ep_rank == 0 else [])
        for suffix, param in params.items():
            name, start = layer.flat_slot(local_id, suffix)
            for target in targets:
                _fill(target[index_of[name]], param, start)

    return fill_expert


def _fill(entry: dict, param: ParamState, start: int = 0) -> None:
    for key in MOMENTS:
        moment = getattr(param, key)
        _slot(entry[key], start, moment.shape).copy_(moment)
