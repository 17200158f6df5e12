"""The MoE block as DeepSpeed AutoEP holds it: experts stacked, one tensor per weight kind.

This is the single-device block of `moe_dispatch=autoep`. Its state-dict names and shapes are
those of DeepSpeed's AutoEPMoELayer (deepspeed.module_inject.auto_ep_layer, 0.19.x), which
replaces it at `deepspeed.initialize` when the DeepSpeed config enables `expert_parallel` with
this block's patterns (`autoep_section`): DeepSpeed then owns the dispatch (a variable-size
all-to-all, no padded buffers) and the kernels (one grouped GEMM for all local experts). Outside
an engine (evaluation, export) the block computes the same function itself, so a checkpoint that
AutoEP saved loads here unchanged:

    router.gate.weight   router rows [E, D]
    expert_bias          selection bias [E], fp32 (loss-free balancing)
    experts.w1           gate projections [E, F, D]
    experts.w2           down projections [E, D, F]
    experts.w3           up projections   [E, F, D]

The rule is the one of our router (moe/router.py) in AutoEP's arithmetic: logits in the input's
dtype, scores in fp32, the bias added only to choose the top-K, combine weights the unbiased scores
of the chosen experts, normalised over them when `route_norm`.

Shape suffixes: B batch, T sequence, S tokens, D hidden size, F expert width, E experts, K
chosen experts per token, R routed rows (S * K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp32_state import Fp32Buffers
from .names import autoep_fused_param, legacy_expert_names, legacy_name, split_autoep_expert_param

STACKED_WEIGHTS = ("w1", "w2", "w3")   # gate, down, up: AutoEP's names for a SwiGLU expert's weights


class StackedRouter(nn.Module):
    """The router's rows, under the name AutoEP's router keeps them (`gate.weight`), and its rule:
    forward(x [S, D], bias [E]) -> (combine weights [S, K] in fp32, chosen experts [S, K]), the
    first two of what AutoEP's router returns."""

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str, route_norm: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k, self.score_func, self.route_norm = top_k, score_func, route_norm

    @property
    def weight(self) -> torch.Tensor:
        # AutoEP reads the rows it copies into its own router as `<router>.weight`.
        return self.gate.weight

    def forward(self, x_SD: torch.Tensor, bias_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_SE = self.gate(x_SD).float()
        scores_SE = torch.sigmoid(logits_SE) if self.score_func == "sigmoid" else torch.softmax(logits_SE, dim=1)
        _, experts_SK = torch.topk(scores_SE + bias_E, k=self.top_k, dim=-1, sorted=False)
        weights_SK = scores_SE.gather(1, experts_SK)
        if self.route_norm:
            weights_SK = weights_SK / (weights_SK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_SK, experts_SK


class StackedExperts(nn.Module):
    """E SwiGLU experts: expert e computes w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, rows_RD: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Rows sorted by expert, counts_E[e] of them for expert e, each through its expert."""
        outputs = []
        for e, rows in enumerate(rows_RD.split(counts_E)):
            hidden = F.silu(rows @ self.w1[e].t()) * (rows @ self.w3[e].t())
            outputs.append(hidden @ self.w2[e].t())
        return torch.cat(outputs)


class StackedMoE(Fp32Buffers):
    """forward(x [B, T, D]) -> [B, T, D]: each token through top_k of num_experts experts."""

    fp32_buffers = ("expert_bias", "tokens_per_expert")   # as in the AutoEP layer

    def __init__(self, dim: int, expert_ffn_dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 route_norm: bool = True) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = StackedRouter(dim, num_experts, top_k, score_func, route_norm)
        self.experts = StackedExperts(dim, expert_ffn_dim, num_experts)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Tokens routed to each expert while training, as AutoEP's layer counts them; not saved.
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts), persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_SD = x_BTD.reshape(-1, x_BTD.shape[-1])
        weights_SK, experts_SK = self.router(x_SD, self.expert_bias)
        counts_E = torch.bincount(experts_SK.reshape(-1), minlength=self.num_experts)
        if self.training:
            self.tokens_per_expert += counts_E.float()
        order_R = torch.argsort(experts_SK.reshape(-1), stable=True)
        token_R = order_R // self.top_k
        out_RD = self.experts(x_SD[token_R], counts_E.tolist())
        weighted_RD = out_RD * weights_SK.reshape(-1)[order_R].unsqueeze(-1).to(out_RD.dtype)
        return x_SD.new_zeros(x_SD.shape).index_add(0, token_R, weighted_RD).reshape(x_BTD.shape)


class StackedFeedForward(nn.Module):
    """A decoder layer's MoE feed-forward on the stacked block, held as `moe` (the module AutoEP
    replaces); returns (output, auxiliary loss) like MoEFeedForward, the loss always zero: AutoEP's
    router has none, so this path balances by the selection bias alone."""

    def __init__(self, dim: int, expert_ffn_dim: int, num_experts: int, top_k: int, score_func: str,
                 route_norm: bool) -> None:
        super().__init__()
        self.moe = StackedMoE(dim, expert_ffn_dim, num_experts, top_k, score_func, route_norm)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moe(x_BTD), x_BTD.new_zeros((), dtype=torch.float32)


def stack_expert_slices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every AutoEP expert weight given expert by expert (`<path>.experts.w1.<id>`) as
    the stacked tensor a StackedMoE holds (`<path>.experts.w1` [E, ...], ids 0..E-1 in order)."""
    slices: dict[str, dict[int, torch.Tensor]] = {}
    stacked = {}
    for name, tensor in state.items():
        parts = split_autoep_expert_param(name)  # DeepSpeed writes AutoEP experts one file per expert
        if parts is None:
            stacked[name] = tensor
        else:
            path, weight, expert = parts
            slices.setdefault(autoep_fused_param(path, weight), {})[expert] = tensor
    for fused, by_id in slices.items():
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"{fused}: experts {sorted(by_id)} are not 0..{len(by_id) - 1}")
        stacked[fused] = torch.stack([by_id[e] for e in range(len(by_id))])
    return stacked


def legacy_layout_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict with every stacked block's tensors under the legacy layer's names (views,
    no copies): what code written for one expert layout (the Hugging Face families) reads."""
    out = {}
    for name, tensor in state.items():
        per_expert = legacy_expert_names(name, tensor.shape[0]) if tensor.dim() else None
        if per_expert is None:
            out[legacy_name(name)] = tensor
        else:
            out.update(zip(per_expert, tensor))
    return out


def autoep_section(top_k: int, score_func: str, route_norm: bool, ep_size: int) -> dict:
    """The DeepSpeed config's `expert_parallel` section that has AutoEP replace every StackedMoE of
    our model (held at `layers.<i>.ffn.moe`) with its own layer, the same function."""
    return {"enabled": True, "autoep_size": ep_size, "moe_layer_pattern": r"layers\.\d+\.ffn\.moe",
            "router_pattern": "router", "expert_pattern": "experts", "expert_w1": "w1", "expert_w2": "w2",
            "expert_w3": "w3", "top_k": top_k, "score_func": score_func, "route_norm": route_norm,
            "score_apply": "post", "expert_activation": "swiglu"}
