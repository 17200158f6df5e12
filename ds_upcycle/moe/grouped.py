"""Grouped expert computation: every local expert in one grouped GEMM, no padded buffers.

DeepSpeed's legacy MOELayer gives each expert a buffer of the busiest expert's size and runs one
small matmul per expert, which is bound by kernel launches when experts are many. Here the tokens'
K choices are sorted by expert (a stable sort: tokens keep their order within an expert), each
expert's rows are contiguous, and DeepSpeed AutoEP's expert kernel (deepspeed.moe.ep_experts,
torch._grouped_mm) computes all experts at once; the outputs are weighted and summed back onto their
tokens. The experts' weights stay where DeepSpeed's MoE module keeps them (one SwiGLU per expert,
so checkpoints are the same as the legacy layer's); they are stacked for each call.

Shape suffixes: S tokens, K choices per token, R = S * K routed rows, D model dim, H expert width,
E experts.
"""

from __future__ import annotations

import torch
from deepspeed.moe.ep_experts import _run_experts_grouped_mm
from torch import nn


def grouped_experts(x_SD: torch.Tensor, experts_SK: torch.Tensor, weights_SK: torch.Tensor,
                    local_experts: nn.ModuleList) -> torch.Tensor:
    """sum_k weights_SK[s, k] * expert_{experts_SK[s, k]}(x_SD[s]) for every token s (ep_size 1)."""
    S, K = experts_SK.shape
    E = len(local_experts)
    experts_R = experts_SK.reshape(-1)
    order_R = torch.argsort(experts_R, stable=True)
    token_R = order_R // K
    counts_E = torch.bincount(experts_R, minlength=E)
    w_gate_EHD = torch.stack([expert.w_gate.weight for expert in local_experts])
    w_up_EHD = torch.stack([expert.w_up.weight for expert in local_experts])
    w_down_EDH = torch.stack([expert.w_down.weight for expert in local_experts])
    out_RD = _run_experts_grouped_mm(w_gate_EHD, w_down_EDH, w_up_EHD, x_SD[token_R], counts_E)
    weighted_RD = out_RD * weights_SK.reshape(-1)[order_R].unsqueeze(-1).to(out_RD.dtype)
    return x_SD.new_zeros(S, x_SD.shape[-1]).index_add(0, token_R, weighted_RD)
