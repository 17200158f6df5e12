"""The supported Hugging Face families, and which one a model goes to."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import UserError
from . import ernie4_5_moe, glm4_moe, mixtral, olmoe, qwen3_moe
from .family import Family

# Export tries them in this order: ERNIE 4.5 and GLM-4 MoE carry the selection bias that
# loss-free balancing trains; the bias-free families fit only models whose biases are all zero.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (ernie4_5_moe.FAMILY, glm4_moe.FAMILY, qwen3_moe.FAMILY,
                                                         olmoe.FAMILY, mixtral.FAMILY)}


def import_family(hf_config: dict) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} cannot be imported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def export_family(cfg: ModelConfig, has_bias: bool, prefer: str | None = None) -> Family:
    """The family that computes exactly what `cfg` computes (`prefer` first, e.g. the one it was imported from)."""
    if cfg.route_groups is not None:
        raise UserError("the model routes by expert groups (expand --distinct-copies), which no transformers class "
                        "does; export its source, or train on with --set route_groups=none first")
    if len(set(cfg.experts_per_layer)) > 1:
        raise UserError(f"MoE layers hold different expert counts {cfg.experts_per_layer}, which no transformers "
                        f"class allows; expand every MoE layer to the same count first")
    order = sorted(FAMILIES.values(), key=lambda f: f.model_type != prefer)
    reasons = []
    for family in order:
        reason = family.export_mismatch(cfg, has_bias)
        if reason is None:
            return family
        reasons.append(reason)
    if cfg.score_func == "sigmoid" and cfg.moe_layer_freq > 1:
        raise UserError("no transformers class has a sigmoid router with dense layers between MoE layers (GLM-4 MoE "
                        "scores by sigmoid but is MoE in every layer, ERNIE 4.5 interleaves but scores by softmax); "
                        "train such a model with --set score_func=softmax")
    raise UserError(f"no transformers class computes this model: {'; '.join(reasons)}")


def export_class(cfg: ModelConfig) -> str:
    """The transformers class a trained model of this config exports to (its selection bias is
    non-zero once loss-free balancing has run), or why none."""
    try:
        return export_family(cfg, has_bias=cfg.route_bias_update > 0).architecture
    except UserError:
        return "none (see ds-upcycle export)"
