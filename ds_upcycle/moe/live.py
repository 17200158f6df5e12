"""One view of a live model's MoE blocks, whichever module computes them.

The rest of ds-upcycle asks an MoE block of a built model (a DeepSpeed engine's module, or a model
loaded for evaluation) for a few things: where it sits, its router's rows and selection bias, the
tokens routed to each expert since the bias last moved, which experts this process holds and the
expert-parallel group. Three modules answer, each its own way:

- MoEFeedForward (layer.py): DeepSpeed's legacy MoE layer with our router (moe_dispatch legacy or
  grouped); the block's MoE module is `<path>.moe`;
- StackedMoE (stacked.py): the stacked block of moe_dispatch=autoep outside an engine; all experts;
- AutoEPMoELayer: DeepSpeed AutoEP's layer, which replaced a StackedMoE (or a transformers MoE
  block) at deepspeed.initialize; experts [r * L, (r + 1) * L) of the group on rank r. Its bias
  exists once moe.autoep.prepare_balancing has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from torch import nn

from .balance import balance_biases
from .layer import MoEFeedForward
from .stacked import StackedMoE


@dataclass(frozen=True)
class LiveMoE:
    path: str                      # the MoE module's path in the model (its state-dict prefix)
    num_experts: int               # experts of the layer, all ranks together
    expert_ids: list[int]          # global ids of the experts this process holds
    router_weight: torch.Tensor    # [E, D]
    routing_bias: torch.Tensor | None   # [E], fp32: added to the scores to choose experts
    loads: torch.Tensor            # [E]: tokens routed to each expert since the last bias update
    ep_group: object               # the expert-parallel process group (None: one process holds all)


def live_moe_layers(model: nn.Module) -> list[LiveMoE]:
    """Every MoE block of `model`, in module order."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            router = module.router
            layers.append(LiveMoE(f"{name}.moe", router.num_experts, module.expert_ids, router.wg.weight,
                                  router.route_bias, router.route_load, router.ep_group))
        elif isinstance(module, StackedMoE):
            layers.append(LiveMoE(name, module.num_experts, list(range(module.num_experts)),
                                  module.router.gate.weight, module.expert_bias, module.tokens_per_expert, None))
        elif isinstance(module, AutoEPMoELayer):
            first = module.ep_rank * module.num_local_experts
            layers.append(LiveMoE(name, module.num_experts, list(range(first, first + module.num_local_experts)),
                                  module.router.gate.weight, module.expert_bias, module.tokens_per_expert,
                                  module.ep_group))
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
