"""One Hugging Face model family: its names for our weights, and its config.

Every supported family is Llama-shaped outside the MoE block (embedding, pre-norm attention with
q/k/v/o projections, RMSNorm, SwiGLU), so the mapping is one table generated from the model config;
a family says only where it differs: the MoE block's name and its expert weights' names, where the
router's selection bias lives, whether RoPE rotates interleaved pairs, and how its config.json reads.

`to_hf` and `from_hf` walk the same name pairs, so an export followed by an import gives back every
tensor bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..moe.names import ROUTER_BIAS, expert_param, moe_prefix, router_bias, router_weight

SWIGLU = ("w_gate", "w_up", "w_down")


@dataclass(frozen=True)
class Family:
    """A transformers MoE class and how our model maps onto it.

    Attributes:
        model_type / architecture: config.json's `model_type` and `architectures[0]`.
        config_from_hf: the family's config.json -> our ModelConfig, or UserError naming the feature
            we lack.
        export_mismatch: why this family cannot compute a model (None: it can); `has_bias` says
            whether any router's selection bias is non-zero.
        config_to_hf: our ModelConfig -> the family's config fields.
        moe_block: the MoE module's name inside a decoder layer.
        expert_names: the family's names of gate, up and down projections of an expert.
        bias_name: where the selection bias lives inside the MoE block (None: the family has none).
        bias_rows: the bias tensor's shape is [1, E] (ERNIE 4.5) rather than [E].
        interleaved_rope: RoPE rotates pairs (2i, 2i+1) (GPT-J style); ours rotates (i, i + Dh/2),
            so q and k rows (and per-head q/k norm weights) are permuted on the way.
        zero_shared_expert: the class always builds a shared expert; ours is written as one of the
            experts' width whose weights are all zero (it adds exactly nothing; vLLM's CPU kernels
            cannot run the zero-width one that `n_shared_experts: 0` builds). Import accepts shared
            experts that are all zero, or empty, and refuses any other.
        fused_bias_name: where the selection bias lives in a release with fused experts
            (transformers 5's module names; hf/fused.py), when not at bias_name.
    """

    model_type: str
    architecture: str
    config_from_hf: Callable[[dict], ModelConfig]
    export_mismatch: Callable[[ModelConfig, bool], str | None]
    config_to_hf: Callable[[ModelConfig], dict]
    moe_block: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    bias_name: str | None = None
    bias_rows: bool = False
    interleaved_rope: bool = False
    zero_shared_expert: bool = False
    fused_bias_name: str | None = None

    def name_pairs(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """(our name, the family's name) of every tensor the family stores."""
        pairs = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
        if not cfg.tie_embeddings:
            pairs.append(("output.weight", "lm_head.weight"))
        for i in range(cfg.n_layers):
            ours, theirs = f"layers.{i}.", f"model.layers.{i}."
            pairs += [(ours + "attn_norm.weight", theirs + "input_layernorm.weight"),
                      (ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight")]
            pairs += [(ours + f"attn.w{p}.weight", theirs + f"self_attn.{p}_proj.weight") for p in "qkvo"]
            if cfg.qk_norm is not None:
                pairs += [(ours + f"attn.{p}_norm.weight", theirs + f"self_attn.{p}_norm.weight") for p in "qk"]
            if not cfg.is_moe_layer(i):
                hf_names = ("gate_proj", "up_proj", "down_proj")
                pairs += [(ours + f"ffn.{w}.weight", theirs + f"mlp.{h}.weight") for w, h in zip(SWIGLU, hf_names)]
                continue
            moe, prefix = theirs + self.moe_block + ".", moe_prefix(i)
            pairs.append((router_weight(prefix), moe + "gate.weight"))
            if self.bias_name is not None:
                pairs.append((router_bias(prefix), moe + self.bias_name))
            for e in range(cfg.experts_in_block(i)):
                pairs += [(expert_param(prefix, e, f"{w}.weight"), moe + f"experts.{e}.{h}.weight")
                          for w, h in zip(SWIGLU, self.expert_names)]
        return pairs

    def to_hf(self, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = {theirs: self._convert(ours, state[ours], cfg, to_hf=True) for ours, theirs in self.name_pairs(cfg)}
        if self.zero_shared_expert:
            dtype, width = state["tok_embeddings.weight"].dtype, cfg.expert_ffn_dim
            for i in cfg.moe_layer_ids:
                shared = self.shared_expert_prefix(i)
                shapes = (("gate_proj", (width, cfg.dim)), ("up_proj", (width, cfg.dim)), ("down_proj", (cfg.dim, width)))
                for name, shape in shapes:
                    tensors[shared + name + ".weight"] = torch.zeros(shape, dtype=dtype)
        return tensors

    def shared_expert_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_block}.shared_experts."

    def from_hf(self, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Our state dict from the family's tensors, each converted when it is read (so a lazy
        `tensors` stays lazy); the caller has checked that every name is there."""
        return _FromHF(self, cfg, tensors)

    def is_bias(self, theirs: str) -> bool:
        """Whether the family's tensor `theirs` is a router's selection bias (kept in fp32 on export)."""
        return self.bias_name is not None and theirs.endswith("." + self.bias_name)

    def _convert(self, ours: str, tensor: torch.Tensor, cfg: ModelConfig, to_hf: bool) -> torch.Tensor:
        if ours.endswith(ROUTER_BIAS) and self.bias_rows:
            return tensor.reshape(1, -1) if to_hf else tensor.reshape(-1)
        # q/k norm weights ([Dh] or [H * Dh]) follow the rows of the projections they scale.
        if self.interleaved_rope and ours.endswith(("attn.wq.weight", "attn.wk.weight", "attn.q_norm.weight",
                                                    "attn.k_norm.weight")):
            return _permute_rope_rows(tensor, cfg.head_dim, to_hf)
        return tensor


class _FromHF(Mapping):
    """Family.from_hf's result: our names, each tensor read from the family's and converted on access."""

    def __init__(self, family: Family, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
        self.family, self.cfg, self.tensors = family, cfg, tensors
        self.theirs = dict(family.name_pairs(cfg))
        # A family without a selection bias: ours starts at zero.
        self.zero_biases = {} if family.bias_name is not None else {
            router_bias(moe_prefix(i)): cfg.experts_in_block(i) for i in cfg.moe_layer_ids}

    def __getitem__(self, ours: str) -> torch.Tensor:
        if ours in self.zero_biases:
            return torch.zeros(self.zero_biases[ours])
        return self.family._convert(ours, self.tensors[self.theirs[ours]], self.cfg, to_hf=False)

    def __contains__(self, ours: object) -> bool:  # without reading the tensor, as Mapping's would
        return ours in self.theirs or ours in self.zero_biases

    def __iter__(self) -> Iterator[str]:
        yield from self.theirs
        yield from self.zero_biases

    def __len__(self) -> int:
        return len(self.theirs) + len(self.zero_biases)


def _permute_rope_rows(weight: torch.Tensor, head_dim: int, to_interleaved: bool) -> torch.Tensor:
    """Reorder each head's rows between rotate-half pairs (i, i + Dh/2) and interleaved pairs (2i, 2i+1).

    Interleaved row 2i is our row i and interleaved row 2i + 1 our row i + Dh/2; a permutation of the
    rows of both q and k leaves every attention score unchanged.
    """
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    if not to_interleaved:
        order = torch.argsort(order)
    rows = weight.reshape(-1, head_dim, *weight.shape[1:])
    return rows[:, order].reshape(weight.shape).contiguous()
