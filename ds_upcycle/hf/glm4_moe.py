"""GLM-4 MoE (`Glm4MoeForCausalLM`): sigmoid scores with a selection-only bias, every layer MoE.

Its router is ours with score_func "sigmoid" when it has one expert group, a shared expert that
adds nothing, `routed_scaling_factor` 1 and a full rotary factor. Export writes one shared expert
whose weights are zero (`n_shared_experts: 0` would build a zero-width one, which transformers
runs but vLLM's CPU kernels do not); import accepts a shared expert only when its weights are
zero or empty. It only has "the first k layers dense", so an interleaved model does not fit.
"""

from __future__ import annotations

from ..config import ModelConfig
from .config_fields import build, common_from_hf, common_to_hf, lacks, moe_layer_freq
from .family import Family


def config_to_hf(cfg: ModelConfig) -> dict:
    fields = common_to_hf(cfg)
    fields["rope_parameters"]["partial_rotary_factor"] = 1.0
    return {**fields, "intermediate_size": cfg.dense_ffn_dim, "moe_intermediate_size": cfg.expert_ffn_dim,
            "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "n_shared_experts": 1,
            "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "norm_topk_prob": cfg.normalize_routes,
            "routed_scaling_factor": 1.0, "use_qk_norm": cfg.qk_norm == "head", "attention_bias": False,
            "num_mtp_layers": 0, "head_dim": cfg.head_dim}


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("routed_scaling_factor", 1.0) != 1.0:
        raise lacks(hf, "a routed_scaling_factor other than 1")
    if hf.get("n_group", 1) > 1 and hf.get("topk_group", 1) < hf["n_group"]:
        raise lacks(hf, "group-limited routing (topk_group < n_group)")
    n, first_dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 1)
    return build(hf, **common_from_hf(hf), dense_ffn_dim=hf["intermediate_size"],
                 expert_ffn_dim=hf["moe_intermediate_size"], num_experts=hf["n_routed_experts"],
                 top_k=hf["num_experts_per_tok"],
                 moe_layer_freq=moe_layer_freq(hf, [i >= first_dense for i in range(n)]),
                 score_func="sigmoid", route_norm=bool(hf.get("norm_topk_prob", True)),
                 qk_norm="head" if hf.get("use_qk_norm") else None)


def export_mismatch(cfg: ModelConfig, has_bias: bool) -> str | None:
    if cfg.score_func != "sigmoid":
        return "GLM-4 MoE scores by sigmoid"
    if cfg.moe_layer_freq != 1:
        return "GLM-4 MoE has no dense layers between MoE layers (only the first k dense)"
    if cfg.qk_norm == "proj":
        return "GLM-4 MoE's q/k norm is per head"
    if min(cfg.experts_per_layer) < 2:
        return "GLM-4 MoE needs two experts or more"
    return None


FAMILY = Family("glm4_moe", "Glm4MoeForCausalLM", config_from_hf, export_mismatch, config_to_hf,
                bias_name="gate.e_score_correction_bias", zero_shared_expert=True)
