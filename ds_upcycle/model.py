"""Decoder-only MoE language model: RMSNorm, grouped-query attention with RoPE, SwiGLU.

Single-device code: the only parallel notion here is which experts this process holds
(`ep_size`, `ep_rank`), which DeepSpeed's MoE layer needs at construction. Process groups,
ZeRO and checkpoints are set up by the training script.

Shape suffixes: B batch, T sequence, D hidden, H query heads, G key/value heads, Dh head dim,
V vocabulary.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .moe.layer import MoEFeedForward, SwiGLU
from .moe.router import LossFreeRouter


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles_TDh = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles_TDh = torch.cat([angles_TDh, angles_TDh], dim=-1)
    return angles_TDh.cos(), angles_TDh.sin()


def apply_rope(x_BHTDh: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
    half = x_BHTDh.shape[-1] // 2
    rotated = torch.cat([-x_BHTDh[..., half:], x_BHTDh[..., :half]], dim=-1)
    return (x_BHTDh.float() * cos_TDh + rotated.float() * sin_TDh).type_as(x_BHTDh)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTDh = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTDh = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTDh = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTDh, k_BGTDh = apply_rope(q_BHTDh, cos_TDh, sin_TDh), apply_rope(k_BGTDh, cos_TDh, sin_TDh)
        out_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, is_causal=True,
                                                   enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out_BHTDh.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, ep_size: int, ep_rank: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        if self.is_moe:
            router = LossFreeRouter(cfg.dim, cfg.num_experts, cfg.top_k, cfg.score_func,
                                    cfg.normalize_routes, cfg.aux_loss_coef)
            self.ffn = MoEFeedForward(cfg.dim, cfg.expert_ffn_dim, cfg.num_experts, cfg.top_k, router,
                                      ep_size=ep_size, ep_rank=ep_rank)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.dense_ffn_dim)

    def forward(self, x_BTD, cos_TDh, sin_TDh) -> tuple[torch.Tensor, torch.Tensor]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TDh, sin_TDh)
        if self.is_moe:
            ffn_BTD, aux_loss = self.ffn(self.ffn_norm(x_BTD))
        else:
            ffn_BTD, aux_loss = self.ffn(self.ffn_norm(x_BTD)), x_BTD.new_zeros((), dtype=torch.float32)
        return x_BTD + ffn_BTD, aux_loss


class Transformer(nn.Module):
    """forward(tokens [B, T]) -> (logits [B, T, V], auxiliary balance loss summed over layers)."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1, ep_rank: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, ep_size, ep_rank) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights(seed)

    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        return [block.ffn for block in self.layers if block.is_moe]

    @property
    def routers(self) -> list[LossFreeRouter]:
        return [ffn.router for ffn in self.moe_layers]

    def global_param_names(self) -> dict[str, str]:
        """Map each parameter name to its layout-independent name (experts by global id)."""
        names = {}
        for block_id, block in enumerate(self.layers):
            if not block.is_moe:
                continue
            for local_id, global_id in enumerate(block.ffn.expert_ids):
                prefix = f"layers.{block_id}.ffn.moe.deepspeed_moe.experts.deepspeed_experts."
                names[prefix + f"{local_id}."] = prefix + f"{global_id}."
        mapping = {}
        for name, _ in self.named_parameters():
            match = re.match(r"(.*deepspeed_experts\.\d+\.)", name)
            mapping[name] = names[match.group(1)] + name[match.end():] if match else name
        return mapping

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seed every tensor by its global name, so the model is the same on any parallel layout."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, global_name in self.global_param_names().items():
            param = self.get_parameter(name)
            if "norm" in name:
                param.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
            std = residual_std if name.endswith(("wo.weight", "w_down.weight")) else self.cfg.init_std
            param.copy_(torch.randn(param.shape, generator=gen) * std)

    def forward(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_BTD = self.tok_embeddings(tokens_BT)
        cos_TDh, sin_TDh = rope_tables(tokens_BT.shape[1], self.cfg.head_dim, self.cfg.rope_theta, tokens_BT.device)
        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x_BTD, layer_aux = block(x_BTD, cos_TDh, sin_TDh)
            aux_loss = aux_loss + layer_aux
        return self.output(self.norm(x_BTD)), aux_loss
