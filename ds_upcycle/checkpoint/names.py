"""File and parameter names of a DeepSpeed MoE checkpoint (deepspeed 0.19.x, no tensor parallelism)."""

from __future__ import annotations

import re

# Parameter names inside the module are DeepSpeed's module paths, kept with the MoE layer.
from ..moe.names import (AUTOEP_EXPERT_WEIGHTS, autoep_expert_param, autoep_fused_param, autoep_router_bias,
                         autoep_router_weight, expert_param, router_bias, router_weight, split_autoep_fused_param,
                         split_expert_param)

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO_FILE = re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")
ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
MODEL_FILE = re.compile(r"^mp_rank_(?P<mp>\d+)_model_states\.pt$")


def zero_file(rank: int, bf16: bool = False) -> str:
    """A rank's optimizer file; DeepSpeed prefixes it with bf16_ when bf16 is enabled."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def expert_file(layer: int, expert: int) -> str:
    """Per-expert module weights; `layer` counts MoE modules in module order, `expert` is global."""
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


__all__ = ["AUTOEP_EXPERT_WEIGHTS", "MODEL_FILE", "MODEL_STATES", "ZERO3_MODEL_FILE", "ZERO_FILE",
           "autoep_expert_param", "autoep_fused_param", "autoep_router_bias", "autoep_router_weight", "expert_file",
           "expert_param", "router_bias", "router_weight", "split_autoep_fused_param", "split_expert_param",
           "zero_file"]
