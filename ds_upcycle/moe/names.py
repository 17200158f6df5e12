"""Where DeepSpeed's MoE module keeps its parts, by state-dict name (deepspeed.moe.layer.MoE, 0.19.x).

Every name of an MoE parameter in a model, a DeepSpeed checkpoint or a Hugging Face mapping is
built here. A decoder layer's MoE block (layer.py) holds DeepSpeed's module as `ffn.moe`, so:

    layers.{i}.ffn.moe                                                  the MoE module (its "prefix")
    layers.{i}.ffn.moe.deepspeed_moe.gate.wg.weight                     router rows [E, D]
    layers.{i}.ffn.moe.deepspeed_moe.gate.route_bias                    selection bias [E] (our router)
    layers.{i}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{e}.*    expert e's weights

DeepSpeed names experts by the id local to their rank; checkpoints and ds-upcycle's layout-free
state use global ids in the same place.
"""

from __future__ import annotations

import re

MOE_MODULE = "ffn.moe"                   # DeepSpeed's MoE module inside one of our decoder layers
GATE = ".deepspeed_moe.gate"             # the router module inside an MoE module
ROUTER_WEIGHT = GATE + ".wg.weight"
ROUTER_BIAS = GATE + ".route_bias"
EXPERTS_INFIX = ".deepspeed_moe.experts.deepspeed_experts."
# <MoE module path>.deepspeed_moe.experts.deepspeed_experts.<expert id>.<parameter inside the expert>
EXPERT_PARAM = re.compile(r"^(?P<prefix>.+)" + re.escape(EXPERTS_INFIX) + r"(?P<expert>\d+)\.(?P<suffix>.+)$")


def moe_prefix(layer_id: int) -> str:
    """The MoE module of decoder layer `layer_id` of our model."""
    return f"layers.{layer_id}.{MOE_MODULE}"


def router_weight(prefix: str) -> str:
    return prefix + ROUTER_WEIGHT


def router_bias(prefix: str) -> str:
    return prefix + ROUTER_BIAS


def expert_param(prefix: str, expert: int, suffix: str) -> str:
    return f"{prefix}{EXPERTS_INFIX}{expert}.{suffix}"


def split_expert_param(name: str) -> tuple[str, int, str] | None:
    """(MoE module path, expert id, name inside the expert), or None for a non-expert name."""
    match = EXPERT_PARAM.match(name)
    return (match["prefix"], int(match["expert"]), match["suffix"]) if match else None


def with_expert_id(name: str, expert: int) -> str:
    """An expert parameter's name with another expert id (local <-> global)."""
    prefix, _, suffix = split_expert_param(name)
    return expert_param(prefix, expert, suffix)


# DeepSpeed AutoEP's layer (deepspeed.module_inject.auto_ep_layer.AutoEPMoELayer, 0.19.x) replaces a
# model's MoE block in place, so its names start with the block's own module path P:
#
#     P.router.gate.weight      router rows [E, D] (also saved under the block's old router name,
#                               e.g. P.gate.gate.weight: a second name of the same module)
#     P.expert_bias             selection bias [E] (when loss-free balancing is attached)
#     P.experts.w1 / w2 / w3    the rank's experts fused [E_local, ...]: w1 gate, w3 up, w2 down
#     P.experts.w1.G            expert G's slice, as the per-expert files key it (global id)
AUTOEP_EXPERT_WEIGHTS = ("w1", "w2", "w3")
AUTOEP_FUSED_PARAM = re.compile(r"^(?P<path>.+)\.experts\.(?P<weight>w[123])$")
AUTOEP_EXPERT_PARAM = re.compile(r"^(?P<path>.+)\.experts\.(?P<weight>w[123])\.(?P<expert>\d+)$")


def autoep_router_weight(path: str) -> str:
    return f"{path}.router.gate.weight"


def autoep_router_bias(path: str) -> str:
    return f"{path}.expert_bias"


def autoep_fused_param(path: str, weight: str) -> str:
    return f"{path}.experts.{weight}"


def autoep_expert_param(path: str, expert: int, weight: str) -> str:
    return f"{path}.experts.{weight}.{expert}"


def split_autoep_expert_param(name: str) -> tuple[str, str, int] | None:
    """(AutoEP layer path, weight name, global expert id) of one expert's slice, or None."""
    match = AUTOEP_EXPERT_PARAM.match(name)
    return (match["path"], match["weight"], int(match["expert"])) if match else None


def split_autoep_fused_param(name: str) -> tuple[str, str] | None:
    """(AutoEP layer path, weight name) of a fused expert parameter, or None for any other name."""
    match = AUTOEP_FUSED_PARAM.match(name)
    return (match["path"], match["weight"]) if match else None


# The stacked block of moe_dispatch=autoep (moe/stacked.py) sits where DeepSpeed's MoE module sits,
# with AutoEP's names inside. Its initial weights are drawn under the legacy layer's names (so a
# model starts from the same weights whichever dispatch it trains with), and export reads it under
# them (the Hugging Face families know the legacy names).
STACKED_ROUTER = ".router.gate.weight"
STACKED_BIAS = ".expert_bias"
LEGACY_OF_STACKED = {"w1": "w_gate.weight", "w2": "w_down.weight", "w3": "w_up.weight"}


def legacy_name(name: str) -> str:
    """The legacy layer's name of a stacked block's router rows or selection bias; any other name as is."""
    if name.endswith(STACKED_ROUTER):
        return name.removesuffix(STACKED_ROUTER) + ROUTER_WEIGHT
    if name.endswith(STACKED_BIAS):
        return name.removesuffix(STACKED_BIAS) + ROUTER_BIAS
    return name


def legacy_expert_names(name: str, num_experts: int) -> list[str] | None:
    """The legacy layer's names of the slices of a stacked expert weight, expert by expert; None for
    any other name."""
    parts = split_autoep_fused_param(name)
    if parts is None:
        return None
    path, weight = parts
    return [expert_param(path, e, LEGACY_OF_STACKED[weight]) for e in range(num_experts)]
