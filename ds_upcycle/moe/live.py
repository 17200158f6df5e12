"""One view of a live model's MoE blocks, whichever module computes them.

The rest of ds-upcycle asks an MoE block of a built model (a DeepSpeed engine's module, or a model
loaded for evaluation) for a few things: where it sits, its router's rows and selection bias, the
tokens routed to each expert since the bias last moved, which experts this process holds and the
expert-parallel group. Three modules answer, each its own way:

- MoEFeedForward (layer.py): DeepSpeed's legacy MoE layer with our router (moe_dispatch=legacy);
  the block's MoE module is `<path>.moe`;
- StackedMoE (stacked.py): the stacked block of moe_dispatch=autoep outside an engine; all experts;
- AutoEPMoELayer: DeepSpeed AutoEP's layer, which replaced a StackedMoE (or a transformers MoE
  block) at deepspeed.initialize; experts [r * L, (r + 1) * L) of the group on rank r. Its bias
  exists once moe.autoep.prepare_balancing has run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from torch import nn

from .balance import balance_biases
from .layer import MoEFeedForward
from .stacked import STACKED_WEIGHTS, StackedMoE


class LiveMoE(ABC):
    """One MoE block of a live model: what callers read of it, computed from the module each time
    (DeepSpeed may swap a parameter's storage, so nothing is cached)."""

    def __init__(self, path: str, module: nn.Module) -> None:
        self.path, self.module = path, module

    num_experts: int                          # experts of the layer, all ranks together

    # Properties of every kind of block (each subclass defines them):
    #   expert_ids      global ids of the experts this process holds, in local order
    #   router_weight   [E, D] router rows
    #   routing_bias    [E] fp32 selection bias, added to the scores to choose experts (None: none yet)
    #   loads           [E] tokens routed to each expert since the last bias update
    #   ep_group        the expert-parallel process group (None: this process holds every expert)
    #   ep_group_name   DeepSpeed's name of the layer's expert-parallel groups

    @abstractmethod
    def expert_parameters(self) -> list[tuple[int, str, nn.Parameter, int | None]]:
        """(global expert id, weight name, parameter, index of the expert's slice in it or None when
        the parameter is the expert's alone) of every local expert's weights."""

    @abstractmethod
    def on_routes(self, fn: Callable[[torch.Tensor], None]):
        """Call fn(chosen experts [S, K], by global id) at every routing; returns the hook's handle."""

    @abstractmethod
    def zero_loads(self) -> None:
        """A fresh zero `loads` counter (not in a checkpoint: a model built on the meta device and
        loaded with assign=True would keep it there)."""

    def expert_weights(self) -> list[list[torch.Tensor]]:
        """Each local expert's weight tensors (gate, up and down projections, in the layout's order)."""
        weights: dict[int, list[torch.Tensor]] = {}
        for expert, _, param, index in self.expert_parameters():
            weights.setdefault(expert, []).append(param if index is None else param[index])
        return list(weights.values())


class LegacyMoE(LiveMoE):
    """MoEFeedForward: DeepSpeed's MoE module (`<path>`) with our router in place of its gate."""

    def __init__(self, path: str, module: MoEFeedForward) -> None:
        super().__init__(path, module)
        self.router = module.router
        self.num_experts = self.router.num_experts

    expert_ids = property(lambda self: self.module.expert_ids)
    router_weight = property(lambda self: self.router.wg.weight)
    routing_bias = property(lambda self: self.router.route_bias)
    loads = property(lambda self: self.router.route_load)
    ep_group = property(lambda self: self.router.ep_group)
    ep_group_name = property(lambda self: self.module.moe.expert_group_name)

    def expert_parameters(self):
        return [(expert, name, param, None) for expert, module in zip(self.expert_ids, self.module.local_experts)
                for name, param in module.named_parameters()]

    def on_routes(self, fn):
        return self.router.register_forward_hook(lambda _m, _i, routes: fn(routes.experts_KS.t()))

    def zero_loads(self) -> None:
        self.router.route_load = torch.zeros(self.num_experts)


class StackedLiveMoE(LiveMoE):
    """StackedMoE and DeepSpeed AutoEP's layer: experts stacked [E_local, ...] as w1, w2, w3, the
    router's forward returning (weights, chosen experts, ...)."""

    def __init__(self, path: str, module: StackedMoE | AutoEPMoELayer) -> None:
        super().__init__(path, module)
        self.num_experts = module.num_experts

    @property
    def expert_ids(self) -> list[int]:
        local = getattr(self.module, "num_local_experts", self.num_experts)
        first = getattr(self.module, "ep_rank", 0) * local
        return list(range(first, first + local))

    router_weight = property(lambda self: self.module.router.gate.weight)
    routing_bias = property(lambda self: self.module.expert_bias)
    loads = property(lambda self: self.module.tokens_per_expert)
    ep_group = property(lambda self: getattr(self.module, "ep_group", None))
    ep_group_name = property(lambda self: getattr(self.module, "ep_group_name", None))

    def expert_parameters(self):
        experts = self.module.experts
        return [(expert, name, getattr(experts, name), index) for index, expert in enumerate(self.expert_ids)
                for name in STACKED_WEIGHTS]

    def on_routes(self, fn):
        return self.module.router.register_forward_hook(lambda _m, _i, out: fn(out[1]))

    def zero_loads(self) -> None:
        self.module.tokens_per_expert = torch.zeros(self.num_experts)


def live_moe_layers(model: nn.Module) -> list[LiveMoE]:
    """Every MoE block of `model`, in module order."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            layers.append(LegacyMoE(f"{name}.moe", module))
        elif isinstance(module, (StackedMoE, AutoEPMoELayer)):
            layers.append(StackedLiveMoE(name, module))
    return layers


def balance_layers(layers: list[LiveMoE], step_size: float,
                   reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
    """The loss-free bias update of every layer from the load of the whole global batch
    (balance.balance_biases); returns each layer's load statistics."""
    missing = [layer.path for layer in layers if layer.routing_bias is None]
    if missing:
        raise ValueError(f"MoE layer {missing[0]} has no selection bias (AutoEP: run moe.autoep.prepare_balancing)")
    return balance_biases([layer.routing_bias for layer in layers], [layer.loads for layer in layers], step_size,
                          reduce)


def set_routing_groups(model: nn.Module, groups: list[tuple[int, ...] | None] | None) -> None:
    """Every MoE block's routing groups, one entry per block in module order (None: no groups, or
    lift them). Only the legacy router has groups (model config refuses them on the stacked block)."""
    blocks = [layer for layer in live_moe_layers(model) if isinstance(layer, LegacyMoE)]
    for layer, group in zip(blocks, groups or [None] * len(blocks)):
        layer.router.route_group = None if group is None else torch.tensor(group, dtype=torch.long)


def zero_load_counters(model: nn.Module) -> None:
    """Fresh zero token counters in every MoE block (LiveMoE.zero_loads)."""
    for layer in live_moe_layers(model):
        layer.zero_loads()
