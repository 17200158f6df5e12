"""A model's weights as the checkpoint DeepSpeed saves for an engine built without an optimizer.

What `engine.save_checkpoint` writes after `deepspeed.initialize(model=..., config=...)` with no
optimizer: the module weights (no ZeRO; `optimizer` None everywhere), which are then the master
weights, and nothing else. Built from a state dict alone (no process group, no engine), so that
weights converted from elsewhere (a transformers release) are written once, in their own dtype: an
engine on any layout and in any precision loads them (`engine.load_checkpoint(...,
load_module_only=True)`), and readers see fp32 masters equal to them. The stock-DeepSpeed tests
check it against DeepSpeed's own save.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import deepspeed
import torch

from ..errors import UserError
from .names import split_expert_param
from .run_record import RunRecord
from .state import CheckpointMeta, MoELayer, NonExpertState, ParamGroup, ParamState

# The DeepSpeed config an engine without an optimizer records; train.py trains with its own.
MODULE_ONLY_CONFIG = {"train_micro_batch_size_per_gpu": 1}


@dataclass
class FreshSource:
    """Module weights as a CheckpointSource: non-expert parameters in the module dtype (without an
    optimizer they are the masters, and the model file stores them so), parked where `module_state`
    was told; each expert read from `state` only when the writer asks for it."""

    meta: CheckpointMeta
    moe_layers: list[MoELayer]
    non_expert: NonExpertState
    state: Mapping[str, torch.Tensor]

    def non_expert_state(self) -> NonExpertState:
        return self.non_expert

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        moe = self.moe_layers[layer]
        moe.check_expert(expert)
        params = {}
        for suffix in moe.param_shapes:
            name = moe.param_name(expert, suffix)
            tensor = self.state[name]
            if not _fits(tensor.dtype, self.meta.module_dtype):
                raise UserError(f"{name} is {tensor.dtype}, the other weights {self.meta.module_dtype}: mixed "
                                f"precisions are not supported")
            params[suffix] = ParamState(tensor.float())
        return params


def own_dtype(state: Mapping[str, torch.Tensor], param_names: list[str]) -> torch.dtype:
    """The dtype the weights are written in: the non-expert parameters' when they share bf16 or fp32
    (an expert in another is refused when it is read), else fp32 (exact for fp16 and mixed ones)."""
    dtypes = {state[n].dtype for n in param_names if split_expert_param(n) is None}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.float32, torch.bfloat16} else torch.float32


def _fits(dtype: torch.dtype, module_dtype: torch.dtype) -> bool:
    """Whether a tensor of `dtype` is written exactly in `module_dtype`."""
    return module_dtype == torch.float32 or dtype == module_dtype


def module_state(state: Mapping[str, torch.Tensor], param_names: list[str], shared_params: dict[str, str],
                 client_state: dict, run_record: RunRecord | None = None, tokenizer=None,
                 park: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor) -> FreshSource:
    """The checkpoint state of a model's weights alone, written in their own dtype (`own_dtype`).

    state: the module's state dict, in module order (a Mapping that reads each tensor on access is
    read one expert at a time); param_names: its parameters in `named_parameters()` order;
    shared_params: tied names -> the name that holds the tensor. Every other state entry is a
    persistent buffer, written in fp32. park: where each non-expert weight is kept once converted
    (`ScratchFiles.park`: in a file, mapped, so that memory stays flat in the model's depth).
    """
    params = set(param_names)
    # Buffers (routing biases) in fp32, as the model keeps them: loss-free steps are small.
    buffers = {n: state[n].float() if state[n].is_floating_point() else state[n]
               for n in state if n not in params and n not in shared_params}
    layers = _moe_layers(state, param_names)
    dense = [n for n in param_names if split_expert_param(n) is None]
    dtype = own_dtype(state, param_names)
    meta = CheckpointMeta(
        global_steps=0, global_samples=0, skipped_steps=0, lr_scheduler=None, client_state=client_state,
        ds_config=dict(MODULE_ONLY_CONFIG), ds_version=deepspeed.__version__, zero_stage=0, dp_world_size=1,
        ep_size=1, module_dtype=dtype, optimizer_step=None, dense_groups=[ParamGroup({}, dense)],
        expert_hypers=None, optimizer_extras={},
        module_keys=[n for n in state if split_expert_param(n) is None], buffer_names=list(buffers),
        shared_params=dict(shared_params),
        model_extras={"data_sampler": None, "random_ltd": None, "mp_world_size": 1, "ds_autoep_layers": None,
                      "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1}},
        run_record=run_record, tokenizer=tokenizer, has_optimizer=False)
    non_expert = NonExpertState({n: ParamState(park(state[n].to(dtype))) for n in dense}, buffers)
    return FreshSource(meta, layers, non_expert, state)


def _moe_layers(state: Mapping[str, torch.Tensor], param_names: list[str]) -> list[MoELayer]:
    """MoE layers in module order, with the names and shapes of one expert's parameters (expert 0's)."""
    by_prefix: dict[str, list[tuple[int, str, str]]] = {}
    for name in param_names:
        parts = split_expert_param(name)
        if parts is not None:
            by_prefix.setdefault(parts[0], []).append((parts[1], parts[2], name))
    layers = []
    for index, (prefix, entries) in enumerate(by_prefix.items()):
        shapes = {suffix: state[name].shape for expert, suffix, name in entries if expert == 0}
        layers.append(MoELayer(index, prefix, max(e for e, _, _ in entries) + 1, shapes))
    return layers
