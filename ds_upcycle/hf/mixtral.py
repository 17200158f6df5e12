"""Mixtral (`MixtralForCausalLM`): softmax router without a bias, weights renormalised, every layer MoE.

Experts live in `block_sparse_moe` with gate, down and up projections named w1, w2 and w3.
"""

from __future__ import annotations

from ..config import ModelConfig
from .config_fields import build, common_from_hf, common_to_hf, lacks
from .family import Family


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**common_to_hf(cfg), "intermediate_size": cfg.expert_ffn_dim, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "sliding_window": None, "router_jitter_noise": 0.0}


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("sliding_window") is not None:
        raise lacks(hf, "sliding-window attention")
    return build(hf, **common_from_hf(hf), expert_ffn_dim=hf["intermediate_size"],
                 num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], moe_layer_freq=1,
                 score_func="softmax", route_norm=True)


def export_mismatch(cfg: ModelConfig, has_bias: bool) -> str | None:
    if cfg.score_func != "softmax" or has_bias or not cfg.normalize_routes:
        return "Mixtral scores by softmax without a selection bias and renormalises"
    if cfg.qk_norm is not None or cfg.moe_layer_freq != 1:
        return "Mixtral has no q/k norm and no dense layers"
    return None


FAMILY = Family("mixtral", "MixtralForCausalLM", config_from_hf, export_mismatch, config_to_hf,
                moe_block="block_sparse_moe", expert_names=("w1", "w3", "w2"))
