"""Qwen3-MoE (`Qwen3MoeForCausalLM`): softmax router without a bias, per-head q/k RMSNorm.

MoE layers are every `decoder_sparse_step`-th, minus `mlp_only_layers`; combine weights are
renormalised when `norm_topk_prob`. Heads may be wider than hidden / heads (`head_dim`).
"""

from __future__ import annotations

from ..config import ModelConfig
from .config_fields import build, common_from_hf, common_to_hf, lacks, moe_layer_freq
from .family import Family


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**common_to_hf(cfg), "intermediate_size": cfg.dense_ffn_dim, "moe_intermediate_size": cfg.expert_ffn_dim,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
            "decoder_sparse_step": cfg.moe_layer_freq, "mlp_only_layers": [], "norm_topk_prob": cfg.normalize_routes,
            "use_sliding_window": False, "sliding_window": None, "attention_bias": False, "head_dim": cfg.head_dim}


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise lacks(hf, "sliding-window attention")
    n, step, dense = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    is_moe = [i not in dense and (i + 1) % step == 0 for i in range(n)]
    return build(hf, **common_from_hf(hf), dense_ffn_dim=hf["intermediate_size"],
                 expert_ffn_dim=hf["moe_intermediate_size"], num_experts=hf["num_experts"],
                 top_k=hf["num_experts_per_tok"], moe_layer_freq=moe_layer_freq(hf, is_moe), score_func="softmax",
                 route_norm=bool(hf.get("norm_topk_prob", False)), qk_norm="head")


def export_mismatch(cfg: ModelConfig, has_bias: bool) -> str | None:
    if cfg.score_func != "softmax" or has_bias:
        return "Qwen3-MoE scores by softmax without a selection bias"
    if cfg.qk_norm != "head":
        return "Qwen3-MoE always normalises q and k per head"
    return None


FAMILY = Family("qwen3_moe", "Qwen3MoeForCausalLM", config_from_hf, export_mismatch, config_to_hf)
