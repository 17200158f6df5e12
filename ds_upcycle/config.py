"""Model configuration and named presets.

A ModelConfig fully describes the network; it is saved (as JSON) in every checkpoint so any
checkpoint can rebuild its model. Parallel layout (data-parallel size, ep_size) is not part of it:
the same model can be trained or evaluated on any layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import UserError, did_you_mean

SCORE_FUNCTIONS = ("sigmoid", "softmax")
MOE_DISPATCHES = ("legacy", "autoep")
QK_NORMS = ("head", "proj")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE language model.

    Attributes:
        vocab_size: tokenizer size; train.py sets it from the tokenizer it uses.
        dim: hidden size.
        n_layers: transformer blocks.
        n_heads: query heads; dim must be divisible by it.
        n_kv_heads: key/value heads (grouped-query attention); divides n_heads.
        head_size: width of each attention head; None: dim // n_heads (released models such as
            Qwen3-MoE use wider heads).
        qk_norm: RMSNorm on queries and keys before RoPE: "head" normalises each head (Qwen3-MoE,
            GLM-4 MoE), "proj" the whole query and key projections (OLMoE); None: no norm.
        dense_ffn_dim: SwiGLU width of the dense (non-MoE) feed-forward layers.
        expert_ffn_dim: SwiGLU width of each expert.
        num_experts: experts per MoE layer (E).
        layer_experts: experts of each MoE layer, in order, where they differ (a checkpoint
            expanded in some layers only); None: num_experts in every MoE layer.
        route_groups: per MoE layer, the group of every expert (the source expert it copies, set
            by `ds-upcycle expand --distinct-copies`): a token takes at most one expert of a group.
            None: no groups.
        top_k: experts chosen per token.
        moe_layer_freq: 1 = every block is MoE (full MoE); 2 = dense and MoE blocks alternate,
            starting with a dense block (interleaved, Llama-4 style); n = every n-th block is MoE.
        score_func: "softmax" (default) or "sigmoid" over router logits. Softmax with the selection
            bias is ERNIE 4.5's router, which transformers has for every layer pattern (sigmoid only
            in full-MoE classes), and it trained better here (docs/RESULTS.md, "Router scores").
        route_norm: normalise the combine weights over the chosen experts. Default: when top_k > 1
            (with top_k == 1 a normalised weight is always 1 and the router would get no gradient).
        route_bias_update: step size u of the loss-free balancing update
            b_i += u * sign(mean_load - load_i); 0 turns balancing off.
        aux_loss_coef: coefficient of an auxiliary switch-style balance loss (0 = off).
        moe_dispatch: which MoE layer computes the experts (the same function): "legacy",
            DeepSpeed's MOELayer with our router in place of its gate (every expert's buffer padded
            to the busiest expert, one matmul per expert, any ep_size); "autoep", experts stacked
            one tensor per weight kind (moe/stacked.py), which DeepSpeed AutoEP replaces with its
            own layer at deepspeed.initialize (its dispatch and grouped GEMM, its checkpoint
            layout: AutoEP's parameter names), with no auxiliary loss and no routing groups.
        tie_embeddings: share the token embedding with the output head.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        init_std: standard deviation of the normal weight init.
    """

    vocab_size: int = 32000
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_size: int | None = None
    qk_norm: str | None = None
    dense_ffn_dim: int = 768
    expert_ffn_dim: int = 384
    num_experts: int = 8
    layer_experts: tuple[int, ...] | None = None
    route_groups: tuple[tuple[int, ...], ...] | None = None
    top_k: int = 2
    moe_layer_freq: int = 2
    score_func: str = "softmax"
    route_norm: bool | None = None
    route_bias_update: float = 1e-3
    aux_loss_coef: float = 0.0
    moe_dispatch: str = "legacy"
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "dense_ffn_dim",
                    "expert_ffn_dim", "num_experts", "top_k", "moe_layer_freq")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.head_size is None and self.dim % self.n_heads:
            raise UserError(f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_size is not None and (not isinstance(self.head_size, int) or self.head_size < 1):
            raise UserError(f"model config: head_size must be a positive integer, got {self.head_size!r}")
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise UserError(f"model config: qk_norm must be one of {QK_NORMS} or none, got {self.qk_norm!r}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise UserError("model config: head dimension must be even for RoPE")
        if self.layer_experts is not None:
            # JSON gives a list; a tuple keeps the frozen config hashable.
            object.__setattr__(self, "layer_experts", tuple(self.layer_experts))
            if len(self.layer_experts) != len(self.moe_layer_ids):
                raise UserError(f"model config: layer_experts has {len(self.layer_experts)} entries for "
                                f"{len(self.moe_layer_ids)} MoE layers")
            if any(not isinstance(n, int) or n < 1 for n in self.layer_experts):
                raise UserError(f"model config: layer_experts must be positive integers, got {self.layer_experts}")
        if self.route_groups is not None:
            object.__setattr__(self, "route_groups", tuple(tuple(g) for g in self.route_groups))
            sizes = [len(g) for g in self.route_groups]
            if sizes != self.experts_per_layer:
                raise UserError(f"model config: route_groups cover {sizes} experts, the MoE layers have "
                                f"{self.experts_per_layer}")
            for groups in self.route_groups:
                if sorted(set(groups)) != list(range(len(set(groups)))) or len(set(groups)) < self.top_k:
                    raise UserError(f"model config: route_groups {list(groups)} must number groups 0, 1, ... "
                                    f"and have at least top_k {self.top_k} of them")
        if self.top_k > min(self.experts_per_layer, default=self.num_experts):
            raise UserError(f"model config: top_k {self.top_k} exceeds num_experts "
                            f"{min(self.experts_per_layer, default=self.num_experts)} of a MoE layer")
        if self.score_func not in SCORE_FUNCTIONS:
            raise UserError(f"model config: score_func must be one of {SCORE_FUNCTIONS}, got {self.score_func!r}")
        if self.moe_dispatch == "grouped":
            raise UserError("model config: moe_dispatch=grouped is gone: DeepSpeed AutoEP's layer "
                            "(moe_dispatch=autoep) computes experts in one grouped GEMM, faster in every "
                            "training step measured; its checkpoints are the legacy layer's (moe_dispatch=legacy)")
        if self.moe_dispatch not in MOE_DISPATCHES:
            raise UserError(f"model config: moe_dispatch must be one of {MOE_DISPATCHES}, got {self.moe_dispatch!r}")
        if self.moe_dispatch == "autoep" and self.aux_loss_coef > 0:
            raise UserError("model config: moe_dispatch=autoep has no auxiliary balance loss (DeepSpeed AutoEP's "
                            "router computes none): set aux_loss_coef=0, or use moe_dispatch=legacy")
        if self.moe_dispatch == "autoep" and self.route_groups is not None:
            raise UserError("model config: moe_dispatch=autoep has no routing groups (expand --distinct-copies): "
                            "AutoEP's router picks the top-K experts alone; use moe_dispatch=legacy")
        if self.route_bias_update < 0 or self.aux_loss_coef < 0:
            raise UserError("model config: route_bias_update and aux_loss_coef must be >= 0")
        if self.moe_layer_freq > self.n_layers:
            raise UserError(f"model config: moe_layer_freq {self.moe_layer_freq} leaves no MoE layer "
                            f"in {self.n_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads if self.head_size is None else self.head_size

    @property
    def normalize_routes(self) -> bool:
        return self.top_k > 1 if self.route_norm is None else self.route_norm

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers moe_layer_freq-1, 2*moe_layer_freq-1, ... are MoE (interleaved starts dense)."""
        return (layer_id + 1) % self.moe_layer_freq == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def experts_per_layer(self) -> list[int]:
        """Experts of each MoE layer, in module order."""
        if self.layer_experts is not None:
            return list(self.layer_experts)
        return [self.num_experts] * len(self.moe_layer_ids)

    def experts_in_block(self, layer_id: int) -> int:
        return self.experts_per_layer[self.moe_layer_ids.index(layer_id)]

    def groups_in_block(self, layer_id: int) -> tuple[int, ...] | None:
        return None if self.route_groups is None else self.route_groups[self.moe_layer_ids.index(layer_id)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"model config: unknown field(s) {', '.join(unknown)}")
        if values.get("moe_dispatch") == "grouped":  # a run of an earlier version: the legacy layer's weights
            values = {**values, "moe_dispatch": "legacy"}
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# The paper's shapes (interleaved: hidden 1024/2048, 8/16 heads, top-2, 32 experts; full MoE:
# 256 experts, top-8, GQA). The grouped-query ratio (4 query heads per KV head) and the 8-layer
# variant of the 1024-wide model are our choices where the paper gives no number.
PRESETS: dict[str, ModelConfig] = {
    # Train in minutes on 2 CPU cores. "tiny" puts every FFN in experts, so expert count shows
    # clearly in validation loss; "tiny-il" is the interleaved layout at the same width.
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=384,
                        expert_ffn_dim=128, num_experts=4, top_k=2, moe_layer_freq=1),
    "tiny-il": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=384,
                           expert_ffn_dim=192, num_experts=4, top_k=2, moe_layer_freq=2),
    # Small enough for a one-hour CPU experiment on real text.
    "small": ModelConfig(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, dense_ffn_dim=768,
                         expert_ffn_dim=384, num_experts=8, top_k=2, moe_layer_freq=2),
    "paper-il8": ModelConfig(dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, dense_ffn_dim=3584,
                             expert_ffn_dim=1536, num_experts=32, top_k=2, moe_layer_freq=2),
    "paper-il10": ModelConfig(dim=1024, n_layers=10, n_heads=8, n_kv_heads=2, dense_ffn_dim=3584,
                              expert_ffn_dim=1536, num_experts=32, top_k=2, moe_layer_freq=2),
    "paper-il20": ModelConfig(dim=2048, n_layers=20, n_heads=16, n_kv_heads=4, dense_ffn_dim=7168,
                              expert_ffn_dim=3072, num_experts=32, top_k=2, moe_layer_freq=2),
    "paper-full": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, dense_ffn_dim=2048,
                              expert_ffn_dim=768, num_experts=256, top_k=8, moe_layer_freq=1),
}


def check_expert_parallel(ep_size: int, expert_counts: Sequence[int], world_size: int | None = None,
                          ep_name: str = "ep_size", world_name: str = "world size") -> None:
    """What DeepSpeed's expert parallelism needs: whole expert-parallel groups of ranks, and every MoE
    layer's experts split evenly over the group (ep_name and world_name: how the caller's user knows them)."""
    if ep_size < 1 or (world_size is not None and (world_size < 1 or world_size % ep_size)):
        raise UserError(f"{world_name} {world_size} is not divisible by {ep_name} {ep_size}")
    counts = sorted(set(expert_counts))
    if any(count % ep_size for count in counts):
        what = f"num_experts {counts[0]} is" if len(counts) == 1 else f"experts per MoE layer {list(expert_counts)} are"
        raise UserError(f"{what} not divisible by {ep_name} {ep_size}")


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}{did_you_mean(name, PRESETS)}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_SCALARS = {"int": int, "float": (int, float), "str": str, "bool": bool}


def field_value(field: dataclasses.Field, value: Any) -> Any:
    """`value` as the config field's declared type (scalars, `X | None`, `tuple[X, ...]`).

    Text that stands for a scalar (from a command line: "16", "true", "none", "auto" for an
    optional bool) is read as the type; a value from a JSON or YAML file must already be of it (a
    list for a tuple, of that item type). Raises ValueError saying what the field takes.
    """
    kind = field.type if isinstance(field.type, str) else str(field.type)
    optional, base = "None" in kind, kind.split(" | ")[0].strip()
    text = value.strip().lower() if isinstance(value, str) else None
    if optional and (value is None or text == "none" or (base == "bool" and text == "auto")):
        return None
    if base.startswith("tuple["):
        item = base.removeprefix("tuple[").split(",")[0].strip()
        if item not in _SCALARS or isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError("a list" if item in _SCALARS else "set by the tool that owns it, or none")
        return tuple(_scalar(item, v, f"a list of {_NOUNS[item]}") for v in value)
    if text is not None and base != "str":
        try:
            return {"int": int, "float": float, "bool": _read_bool}[base](text)
        except (KeyError, ValueError):
            raise ValueError(base) from None
    return _scalar(base, value, base)


_NOUNS = {"int": "integers", "float": "numbers", "str": "strings", "bool": "booleans"}


def _scalar(kind: str, value: Any, expected: str) -> Any:
    if not isinstance(value, _SCALARS[kind]) or (isinstance(value, bool) and kind != "bool"):
        raise ValueError(expected)
    return float(value) if kind == "float" else value


def _read_bool(text: str) -> bool:
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(text)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ["num_experts=16", "top_k=2"] into typed field values."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    values: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise UserError(f"model override {item!r} is not of the form field=value")
        if name not in fields:
            raise UserError(f"unknown model field {name!r}{did_you_mean(name, fields)}")
        try:
            values[name] = field_value(fields[name], text.strip())
        except ValueError:
            raise UserError(f"model override {item!r}: cannot read {text!r} as {fields[name].type}") from None
    return values


def resolve_model_config(preset: str, overrides: list[str] | None = None) -> ModelConfig:
    return get_preset(preset).replace(**parse_overrides(overrides or []))


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts, computed from the config alone."""
    D, V = cfg.dim, cfg.vocab_size
    attention = D * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    qk_norms = {"head": 2 * cfg.head_dim, "proj": cfg.head_dim * (cfg.n_heads + cfg.n_kv_heads)}
    norms = 2 * D + qk_norms.get(cfg.qk_norm, 0)
    dense = 3 * D * cfg.dense_ffn_dim
    expert = 3 * D * cfg.expert_ffn_dim
    experts = cfg.experts_per_layer
    n_moe = len(experts)
    n_dense = cfg.n_layers - n_moe
    shared = V * D * (1 if cfg.tie_embeddings else 2) + D + cfg.n_layers * (attention + norms) + n_dense * dense
    total = shared + sum(D * n + n * expert for n in experts)   # router rows and experts
    active = shared + sum(D * n + cfg.top_k * expert for n in experts)
    return total, active
