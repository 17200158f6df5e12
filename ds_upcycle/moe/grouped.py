"""Grouped expert computation: every local expert in one grouped GEMM, no padded buffers.

DeepSpeed's legacy MOELayer gives each expert a buffer of the busiest expert's size and runs one
small matmul per expert, which is bound by kernel launches when experts are many. Here the tokens'
K choices are sorted by expert (a stable sort: tokens keep their order within an expert), each
expert's rows are contiguous, and DeepSpeed AutoEP's expert kernel (deepspeed.moe.ep_experts,
torch._grouped_mm) computes all experts at once; the outputs are weighted and summed back onto their
tokens. The experts' weights stay where DeepSpeed's MoE module keeps them (one SwiGLU per expert,
so checkpoints are the same as the legacy layer's); they are stacked for each call.

With expert parallelism (ep_size P) each rank holds E / P experts: the sorted rows go to the rank
of their expert in one variable-size all-to-all (comm.exchange_rows; the row counts per expert are
exchanged first), are regrouped there by local expert, computed, and come back the same way. No
buffer is padded to the busiest expert.

Shape suffixes: S tokens, K choices per token, R routed rows (S * K on the sending side), D model
dim, H expert width, E experts, L experts on this rank, P ranks of the expert-parallel group.
"""

from __future__ import annotations

import torch
# The kernel behind AutoEP's GroupedExperts.forward; that module owns stacked [E, H, D] parameters,
# which would change the checkpoint layout, so its function is called on our stacked weights.
from deepspeed.moe.ep_experts import _run_experts_grouped_mm
from torch import nn

from .. import comm


def grouped_experts(x_SD: torch.Tensor, experts_SK: torch.Tensor, weights_SK: torch.Tensor,
                    local_experts: nn.ModuleList, ep_size: int = 1, ep_group=None) -> torch.Tensor:
    """sum_k weights_SK[s, k] * expert_{experts_SK[s, k]}(x_SD[s]) for every token s.

    experts_SK holds global expert ids; this rank holds experts [r * L, (r + 1) * L) of its
    expert-parallel group, L = len(local_experts)."""
    S, K = experts_SK.shape
    experts_R = experts_SK.reshape(-1)
    order_R = torch.argsort(experts_R, stable=True)
    token_R = order_R // K
    counts_E = torch.bincount(experts_R, minlength=len(local_experts) * ep_size)
    if ep_size == 1:
        out_RD = _local_experts(x_SD[token_R], counts_E, local_experts)
    else:
        out_RD = _remote_experts(x_SD[token_R], counts_E, local_experts, ep_size, ep_group)
    weighted_RD = out_RD * weights_SK.reshape(-1)[order_R].unsqueeze(-1).to(out_RD.dtype)
    return x_SD.new_zeros(S, x_SD.shape[-1]).index_add(0, token_R, weighted_RD)


def _local_experts(rows_RD: torch.Tensor, counts_L: torch.Tensor, local_experts: nn.ModuleList) -> torch.Tensor:
    """Rows sorted by local expert, counts_L of each, through their experts in one grouped GEMM."""
    if rows_RD.shape[0] == 0:  # nothing routed here: an empty result that still joins the graph
        return rows_RD * 0
    w_gate_LHD = torch.stack([expert.w_gate.weight for expert in local_experts])
    w_up_LHD = torch.stack([expert.w_up.weight for expert in local_experts])
    w_down_LDH = torch.stack([expert.w_down.weight for expert in local_experts])
    return _run_experts_grouped_mm(w_gate_LHD, w_down_LDH, w_up_LHD, rows_RD, counts_L)


def _remote_experts(rows_RD: torch.Tensor, counts_E: torch.Tensor, local_experts: nn.ModuleList, ep_size: int,
                    ep_group) -> torch.Tensor:
    """Rows sorted by global expert go to the rank holding their expert and come back computed."""
    L = len(local_experts)
    counts_PL = comm.exchange_counts(counts_E, ep_group).view(ep_size, L)  # rows rank p sends to my expert l
    send = counts_E.view(ep_size, L).sum(dim=1).tolist()
    recv = counts_PL.sum(dim=1).tolist()
    arrived_RD = comm.exchange_rows(rows_RD, send, recv, ep_group)  # by source rank, then local expert
    local_R = torch.arange(L, device=rows_RD.device).repeat(ep_size).repeat_interleave(counts_PL.reshape(-1))
    by_expert_R = torch.argsort(local_R, stable=True)
    out_RD = _local_experts(arrived_RD[by_expert_R], counts_PL.sum(dim=0), local_experts)
    back_RD = out_RD[torch.argsort(by_expert_R)]  # the arrival order again
    return comm.exchange_rows(back_RD, recv, send, ep_group)
