"""OLMoE (`OlmoeForCausalLM`): softmax router without a bias, RMSNorm over the whole q and k projections.

Every layer is MoE and its experts' width is `intermediate_size`.
"""

from __future__ import annotations

from ..config import ModelConfig
from .config_fields import build, common_from_hf, common_to_hf, lacks
from .family import Family


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**common_to_hf(cfg), "intermediate_size": cfg.expert_ffn_dim, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.normalize_routes, "clip_qkv": None,
            "attention_bias": False}


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("clip_qkv") is not None:
        raise lacks(hf, "clipping of q, k and v (clip_qkv)")
    return build(hf, **common_from_hf(hf), expert_ffn_dim=hf["intermediate_size"], num_experts=hf["num_experts"],
                 top_k=hf["num_experts_per_tok"], moe_layer_freq=1, score_func="softmax",
                 route_norm=bool(hf.get("norm_topk_prob", False)), qk_norm="proj")


def export_mismatch(cfg: ModelConfig, has_bias: bool) -> str | None:
    if cfg.score_func != "softmax" or has_bias:
        return "OLMoE scores by softmax without a selection bias"
    if cfg.qk_norm != "proj" or cfg.head_size is not None:
        return "OLMoE always normalises the whole q and k projections"
    if cfg.moe_layer_freq != 1:
        return "OLMoE has no dense layers"
    return None


FAMILY = Family("olmoe", "OlmoeForCausalLM", config_from_hf, export_mismatch, config_to_hf)
