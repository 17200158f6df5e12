"""The MoE feed-forward block: DeepSpeed's MoE layer with SwiGLU experts and our router."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from ..config import check_expert_parallel
from .router import LossFreeRouter


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used both as dense feed-forward and as an expert."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoEFeedForward(nn.Module):
    """Routes each token to top_k of num_experts SwiGLU experts.

    Experts live in `moe.deepspeed_moe.experts.deepspeed_experts.<local id>`; this rank holds the
    experts with global ids `expert_ids` (ep_rank * num_local + local id, DeepSpeed's convention).
    """

    def __init__(self, dim: int, expert_ffn_dim: int, num_experts: int, top_k: int,
                 router: LossFreeRouter, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        check_expert_parallel(ep_size, [num_experts])
        self.moe = MoE(hidden_size=dim, expert=SwiGLU(dim, expert_ffn_dim), num_experts=num_experts,
                       ep_size=ep_size, k=top_k, drop_tokens=False, use_rts=False)
        self.moe.deepspeed_moe.gate = router
        local = num_experts // ep_size
        self.expert_ids = list(range(ep_rank * local, (ep_rank + 1) * local))

    @property
    def router(self) -> LossFreeRouter:
        return self.moe.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_BTD, aux_loss, _ = self.moe(x_BTD)
        return out_BTD, aux_loss
