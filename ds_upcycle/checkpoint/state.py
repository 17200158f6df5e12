"""Layout-independent training state of a DeepSpeed MoE checkpoint.

Everything here is full (unpartitioned) tensors named as in the model's state_dict, experts by
their GLOBAL id, so the same state can be written for any data-parallel size and ep_size. The
reader produces it lazily (one expert at a time), the writer consumes anything with the same
interface (`CheckpointSource`), so a caller can transform a checkpoint one MoE layer at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import UserError
from .names import (autoep_expert_param, autoep_fused_param, autoep_router_bias, autoep_router_weight, expert_param,
                    router_bias, router_weight)
from .run_record import RunRecord

MOMENTS = ("exp_avg", "exp_avg_sq")  # the Adam state kept per parameter (besides the shared step)


@dataclass
class ParamState:
    """One parameter: fp32 master weight and Adam moments, all in the parameter's shape."""

    fp32: torch.Tensor
    exp_avg: torch.Tensor | None = None      # None before the optimizer's first step
    exp_avg_sq: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ParamState:
        """The same function applied to weight and moments (e.g. duplicating router rows)."""
        return ParamState(fn(self.fp32), *(None if t is None else fn(t) for t in (self.exp_avg, self.exp_avg_sq)))


@dataclass(frozen=True, eq=False)
class MoELayer:
    """One MoE module: DeepSpeed's deepspeed.moe.layer.MoE, or an AutoEP layer (`autoep`).

    The two name their parts differently (moe/names.py) and lay experts out differently in the
    optimizer's flat groups: the legacy module has one parameter per expert and weight, AutoEP one
    fused parameter [E_local, ...] per weight. Everything else is the same.
    """

    index: int                          # L in layer_{L}_expert_{G}: MoE modules in module order
    prefix: str                         # module path, e.g. "layers.1.ffn.moe" or "model.layers.1.mlp"
    num_experts: int
    param_shapes: dict[str, torch.Size]  # parameters of one expert, in module order, e.g. "w_up.weight"
    autoep: bool = False

    def param_name(self, expert: int, suffix: str) -> str:
        """The module key of one expert's parameter (global id in files and state, local on a rank)."""
        if self.autoep:
            return autoep_expert_param(self.prefix, expert, suffix)
        return expert_param(self.prefix, expert, suffix)

    @property
    def router_weight(self) -> str:
        return autoep_router_weight(self.prefix) if self.autoep else router_weight(self.prefix)

    @property
    def router_bias(self) -> str:
        return autoep_router_bias(self.prefix) if self.autoep else router_bias(self.prefix)

    def flat_params(self, local_count: int) -> list[tuple[str, torch.Size]]:
        """(name, shape) of the parameters of `local_count` local experts, in the optimizer's order."""
        if self.autoep:
            return [(autoep_fused_param(self.prefix, s), torch.Size((local_count, *shape)))
                    for s, shape in self.param_shapes.items()]
        return [(self.param_name(local, s), torch.Size(shape))
                for local in range(local_count) for s, shape in self.param_shapes.items()]

    def flat_slot(self, local: int, suffix: str) -> tuple[str, int]:
        """Where local expert `local`'s parameter `suffix` is: (optimizer parameter, element offset in it)."""
        if self.autoep:
            return autoep_fused_param(self.prefix, suffix), local * math.prod(self.param_shapes[suffix])
        return self.param_name(local, suffix), 0

    def with_experts(self, num_experts: int) -> MoELayer:
        return replace(self, num_experts=num_experts)

    def check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise UserError(f"MoE layer {self.index} has {self.num_experts} experts, no expert {expert}")


@dataclass
class ParamGroup:
    """Hyperparameters of one optimizer parameter group, and (non-expert groups) its parameters."""

    hypers: dict                   # torch param_group entries except "params" (lr, betas, name, ...)
    names: list[str] = field(default_factory=list)


@dataclass
class CheckpointMeta:
    """Everything in a checkpoint besides the parameters, layout-independent."""

    global_steps: int
    global_samples: int
    skipped_steps: int
    lr_scheduler: dict | None
    client_state: dict             # what the training script passed to save_checkpoint
    ds_config: dict
    ds_version: str
    zero_stage: int
    dp_world_size: int             # of the source layout (informational)
    ep_size: int                   # of the source layout (informational)
    module_dtype: torch.dtype      # dtype of the module weights (fp32 master is cast to it)
    optimizer_step: torch.Tensor | None   # Adam step count, shared by all groups
    dense_groups: list[ParamGroup]  # non-expert optimizer groups, in order, with their parameters
    expert_hypers: dict | None      # hyperparameters of the expert groups (None without MoE)
    optimizer_extras: dict          # loss scaler, clip_grad, overflow: copied to every rank
    module_keys: list[str]          # key order of the non-expert module state_dict
    buffer_names: list[str]
    shared_params: dict[str, str]   # tied parameter name -> the name that holds the tensor
    model_extras: dict              # other DeepSpeed model-file entries, copied verbatim
    run_record: RunRecord | None = None   # ds_upcycle.json (model config, run metadata)
    tokenizer: Path | None = None   # tokenizer file of the tag directory
    source: Path | None = None      # tag directory it was read from
    # False: saved by an engine without an optimizer (stage 0): module weights only, in module_dtype,
    # which are then the master weights; no parameter groups, no moments, no step.
    has_optimizer: bool = True
    # A module saved under a second name (AutoEP's router under the block's old router name): each
    # key of the second name -> the key that holds the tensor. Written in the module state, not in
    # shared_params, as DeepSpeed saves them.
    module_aliases: dict[str, str] = field(default_factory=dict)


@dataclass
class NonExpertState:
    params: dict[str, ParamState]   # every non-expert parameter, router weights included
    buffers: dict[str, torch.Tensor]  # persistent module buffers, e.g. routing biases


class CheckpointSource(Protocol):
    """What the writer needs; implemented by every format's reader (lazy) and CheckpointState."""

    meta: CheckpointMeta
    moe_layers: list[MoELayer]

    def non_expert_state(self) -> NonExpertState: ...

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        """The parameters of global expert `expert` of MoE layer `layer`, keyed by name inside the expert.

        The writer may ask for an expert more than once; each call must return the same values.
        """
        ...


class CheckpointReader(CheckpointSource, Protocol):
    """A checkpoint on disk, opened by its format's reader (reader.read_checkpoint picks it)."""

    path: Path          # the tag directory
    world_size: int     # data-parallel size of the layout that wrote it
    ep_size: int

    @property
    def num_experts(self) -> list[int]: ...


@dataclass
class CheckpointState:
    """A whole checkpoint in memory; build one to write a transformed checkpoint."""

    meta: CheckpointMeta
    moe_layers: list[MoELayer]
    non_expert: NonExpertState
    experts: dict[tuple[int, int], dict[str, ParamState]]  # (layer, global expert id) -> parameters

    def non_expert_state(self) -> NonExpertState:
        return self.non_expert

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        return self.experts[(layer, expert)]


def load_state(source: CheckpointSource) -> CheckpointState:
    """Materialise a (lazy) source in memory."""
    experts = {(layer.index, e): source.expert_state(layer.index, e)
               for layer in source.moe_layers for e in range(layer.num_experts)}
    return CheckpointState(source.meta, list(source.moe_layers), source.non_expert_state(), experts)


def named_param_states(source: CheckpointSource) -> dict[str, ParamState]:
    """Every parameter by its layout-independent name (as Transformer.global_param_names() values)."""
    states = dict(source.non_expert_state().params)
    for layer in source.moe_layers:
        for expert in range(layer.num_experts):
            for suffix, state in source.expert_state(layer.index, expert).items():
                states[layer.param_name(expert, suffix)] = state
    return states
