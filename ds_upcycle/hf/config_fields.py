"""The config.json fields every Llama-shaped family shares, both ways, and the checks on features we lack."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import UserError


def lacks(hf: dict, feature: str) -> UserError:
    """The one-line refusal of an import whose model uses a feature ours does not have."""
    return UserError(f"{hf.get('model_type', 'this')} model uses {feature}, which ds-upcycle's model does not "
                     f"have; it cannot be imported")


def common_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    fields = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "hidden_act": "silu",
              "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "attention_dropout": 0.0,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if cfg.head_size is not None:
        fields["head_dim"] = cfg.head_size
    return fields


def common_from_hf(hf: dict) -> dict[str, Any]:
    """ModelConfig fields from the shared part of a config.json; refuses what our model lacks."""
    if hf.get("hidden_act", "silu") != "silu":
        raise lacks(hf, f"activation {hf['hidden_act']!r} (ours is SwiGLU with SiLU)")
    if hf.get("attention_bias") or hf.get("use_bias"):
        raise lacks(hf, "biases in its linear layers")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise lacks(hf, f"RoPE scaling {rope_type!r}")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise lacks(hf, "partial rotary embeddings (partial_rotary_factor < 1)")
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or dim // heads
    return {"vocab_size": hf["vocab_size"], "dim": dim, "n_layers": hf["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_size": None if head_dim * heads == dim else head_dim,
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "tie_embeddings": bool(hf.get("tie_word_embeddings")),
            "init_std": float(hf.get("initializer_range", 0.02))}


def moe_layer_freq(hf: dict, is_moe: list[bool]) -> int:
    """Our moe_layer_freq for a family's per-layer MoE pattern; refuses a pattern we cannot express."""
    for freq in range(1, len(is_moe) + 1):
        if is_moe == [(i + 1) % freq == 0 for i in range(len(is_moe))]:
            return freq
    layers = [i for i, moe in enumerate(is_moe) if moe]
    raise lacks(hf, f"MoE in layers {layers} (ours puts MoE in every n-th layer: n-1, 2n-1, ...)")


def build(hf: dict, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except UserError as err:
        raise UserError(f"{hf.get('model_type', 'this')} config does not fit ds-upcycle's model: {err}") from None
