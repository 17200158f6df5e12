"""Top-K router with auxiliary-loss-free load balancing.

It replaces DeepSpeed's TopKGate inside `deepspeed.moe.layer.MoE` and returns the sparse routing
tuple that DeepSpeed's MOELayer consumes. Differences from the stock gate:

- scores are softmax (default) or sigmoid of the router logits;
- a per-expert routing bias is added to the scores only to *choose* the top-K experts; the combine
  weights come from the unbiased scores of the chosen experts, normalised over them;
- dropless: every expert buffer is sized by the busiest expert, so no token is ever dropped;
- it counts the tokens routed to each expert while training, so that the training loop can update
  the bias from the load of the whole global batch (see `ds_upcycle.moe.balance`);
- optionally (`groups`, set by `ds-upcycle expand --distinct-copies`) experts form groups, the
  copies of one source expert, and a token takes at most one expert of a group: the top-K groups
  by their best member's biased score, and that member. Copies of an expert then never tie for the
  same token, so right after expansion the layer computes exactly what the source computed.

The bias buffer is called `route_bias`: DeepSpeed's checkpoint code treats every state key that
contains the word "expert" as an expert tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import agree_capacity
from ..config import SCORE_FUNCTIONS
from .fp32_state import Fp32Buffers


class SparseRoutes(NamedTuple):
    """What DeepSpeed's MOELayer unpacks from its gate with sparse routes, in its order
    (deepspeed/moe/sharded_moe.py); a forward hook on the router reads the fields by name."""

    aux_loss: torch.Tensor
    capacity: torch.Tensor      # tokens per expert buffer, agreed over the expert-parallel group
    num_experts: int
    experts_KS: torch.Tensor    # int32 expert ids of each token's K choices
    locations_KS: torch.Tensor  # int32 slot of each choice in its expert's buffer
    weights_KS: torch.Tensor    # combine weights
    counts_E: torch.Tensor      # tokens routed to each expert


class LossFreeRouter(Fp32Buffers):
    fp32_buffers = ("route_bias", "route_load")

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 normalize: bool = True, aux_loss_coef: float = 0.0, groups: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if score_func not in SCORE_FUNCTIONS:  # the model config refuses it in one line first
            raise ValueError(f"score_func must be one of {SCORE_FUNCTIONS}, got {score_func!r}")
        # Named `wg` like DeepSpeed's gate so checkpoints of either gate share the router's key.
        self.wg = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.k = top_k
        self.score_func = score_func
        self.normalize = normalize
        self.aux_loss_coef = aux_loss_coef
        self.ep_group = None
        self.register_buffer("route_bias", torch.zeros(num_experts))
        # Tokens routed to each expert since the last bias update; not part of the checkpoint.
        self.register_buffer("route_load", torch.zeros(num_experts), persistent=False)
        # The model config carries the groups, so checkpoints keep the same keys with or without them.
        group_E = None if groups is None else torch.tensor(groups, dtype=torch.long)
        self.register_buffer("route_group", group_E, persistent=False)

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def scores(self, x_SD: torch.Tensor) -> torch.Tensor:
        logits_SE = F.linear(x_SD.float(), self.wg.weight.float())
        if self.score_func == "sigmoid":
            return torch.sigmoid(logits_SE)
        return torch.softmax(logits_SE, dim=-1)

    def route(self, x_SD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts: returns (expert ids [S, K], combine weights [S, K], scores [S, E])."""
        scores_SE = self.scores(x_SD)
        biased_SE = scores_SE.detach() + self.route_bias
        if self.route_group is None:
            _, experts_SK = torch.topk(biased_SE, self.k, dim=-1)
        else:
            experts_SK = self._top_k_distinct_groups(biased_SE)
        weights_SK = scores_SE.gather(1, experts_SK)
        if self.normalize:
            weights_SK = weights_SK / weights_SK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return experts_SK, weights_SK, scores_SE

    def _top_k_distinct_groups(self, biased_SE: torch.Tensor) -> torch.Tensor:
        """The best member of each of the K groups whose best member scores highest."""
        S, E = biased_SE.shape
        group_SE = self.route_group.expand(S, E)
        num_groups = int(self.route_group.max()) + 1
        best_SG = biased_SE.new_full((S, num_groups), float("-inf")).scatter_reduce(
            1, group_SE, biased_SE, reduce="amax")
        _, groups_SK = torch.topk(best_SG, self.k, dim=-1)
        is_best_SE = biased_SE == best_SG.gather(1, group_SE)
        # argmax of a boolean row picks the first True: the lowest-id best member of the group.
        members = [(is_best_SE & (group_SE == groups_SK[:, k:k + 1])).to(torch.uint8).argmax(dim=-1)
                   for k in range(self.k)]
        return torch.stack(members, dim=-1)

    def forward(self, x_SD: torch.Tensor, used_token=None, sparse_routes: bool = True,
                use_tutel: bool = False) -> SparseRoutes:
        if used_token is not None:
            raise NotImplementedError("LossFreeRouter does not support used_token masks")
        if not sparse_routes or use_tutel:
            raise NotImplementedError("LossFreeRouter only provides DeepSpeed's sparse route format")
        num_tokens = x_SD.shape[0]
        experts_SK, weights_SK, scores_SE = self.route(x_SD)

        chosen_SE = torch.zeros_like(scores_SE, dtype=torch.int32).scatter_(1, experts_SK, 1)
        counts_E = chosen_SE.sum(dim=0)
        if self.training:
            self.route_load += counts_E.detach().float()
        # Slot of each (token, expert) pair in the expert's buffer: tokens in order of arrival. The
        # running count goes along the last (contiguous) dim: on a GPU a scan along dim 0 of
        # [S, E] took 3 ms at S = 16k, a third of the layer's forward + backward.
        slots_ES = chosen_SE.t().contiguous().cumsum(dim=1, dtype=torch.int32) - 1
        locations_SK = slots_ES.t().gather(1, experts_SK)
        capacity = agree_capacity(counts_E.max().to(torch.int64), self.ep_group)

        aux_loss = scores_SE.new_zeros(())
        if self.aux_loss_coef > 0:
            # Switch-style: E * sum_i (fraction of routes to i) * (mean normalised score of i).
            probs_SE = scores_SE / scores_SE.sum(dim=-1, keepdim=True)
            route_share_E = counts_E.float() / (num_tokens * self.k)
            aux_loss = self.aux_loss_coef * self.num_experts * (route_share_E * probs_SE.mean(0)).sum()

        return SparseRoutes(aux_loss, capacity, self.num_experts, experts_SK.t().to(torch.int32).contiguous(),
                            locations_SK.t().to(torch.int32).contiguous(), weights_SK.t().contiguous(),
                            counts_E.detach())
