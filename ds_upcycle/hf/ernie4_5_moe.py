"""ERNIE 4.5 MoE (`Ernie4_5_MoeForCausalLM`): softmax scores with a selection-only bias, any MoE interval.

Its router is ours with score_func "softmax": softmax over all experts, top-K of the scores plus
`moe_statics.e_score_correction_bias` (stored [1, E]), combine weights renormalised over the chosen
experts. MoE layers are every `moe_layer_interval`-th from `moe_layer_start_index`, so the
interleaved presets map exactly. Its RoPE rotates interleaved pairs: q and k rows are permuted.
"""

from __future__ import annotations

from ..config import ModelConfig
from .config_fields import build, common_from_hf, common_to_hf, lacks, moe_layer_freq
from .family import Family


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**common_to_hf(cfg), "intermediate_size": cfg.dense_ffn_dim, "moe_intermediate_size": cfg.expert_ffn_dim,
            "moe_k": cfg.top_k, "moe_num_experts": cfg.num_experts, "moe_num_shared_experts": 0,
            "moe_layer_start_index": 0, "moe_layer_end_index": cfg.n_layers - 1,
            "moe_layer_interval": cfg.moe_layer_freq, "use_bias": False}


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("moe_num_shared_experts"):
        raise lacks(hf, "shared experts (moe_num_shared_experts > 0)")
    n, interval = hf["num_hidden_layers"], hf.get("moe_layer_interval", 1)
    start, end = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_end_index", -1)
    end = n - 1 if end == -1 else end
    is_moe = [(i + 1) % interval == 0 and start <= i <= end for i in range(n)]
    return build(hf, **common_from_hf(hf), dense_ffn_dim=hf["intermediate_size"],
                 expert_ffn_dim=hf["moe_intermediate_size"], num_experts=hf["moe_num_experts"], top_k=hf["moe_k"],
                 moe_layer_freq=moe_layer_freq(hf, is_moe), score_func="softmax", route_norm=True)


def export_mismatch(cfg: ModelConfig, has_bias: bool) -> str | None:
    if cfg.score_func != "softmax":
        return "ERNIE 4.5 MoE scores by softmax"
    if not cfg.normalize_routes:
        return "ERNIE 4.5 MoE renormalises the combine weights over the chosen experts"
    if cfg.qk_norm is not None or cfg.head_size is not None:
        return "ERNIE 4.5 MoE has no q/k norm and heads of width dim / n_heads"
    return None


FAMILY = Family("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", config_from_hf, export_mismatch, config_to_hf,
                bias_name="moe_statics.e_score_correction_bias", bias_rows=True, interleaved_rope=True,
                fused_bias_name="gate.moe_statics.e_score_correction_bias")
