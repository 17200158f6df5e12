"""Decoder-only MoE language model: RMSNorm, grouped-query attention with RoPE, SwiGLU.

Single-device code: the only parallel notion here is which experts this process holds
(`ep_size`, `ep_rank`), which DeepSpeed's MoE layer needs at construction. Process groups,
ZeRO and checkpoints are set up by the training script.

Shape suffixes: B batch, T sequence, D hidden, H query heads, G key/value heads, Dh head dim,
V vocabulary, X a projection of all heads (H * Dh or G * Dh).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .moe.layer import MoEFeedForward, SwiGLU
from .moe.names import legacy_expert_names, legacy_name, moe_prefix, split_expert_param, with_expert_id
from .moe.router import LossFreeRouter
from .moe.stacked import StackedFeedForward


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles_TDh = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles_TDh = torch.cat([angles_TDh, angles_TDh], dim=-1)
    return angles_TDh.cos(), angles_TDh.sin()


def apply_rope(x_BHTDh: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
    """Rotate x by its positions' angles; the tables may also be per row ([B, 1, T, Dh])."""
    half = x_BHTDh.shape[-1] // 2
    rotated = torch.cat([-x_BHTDh[..., half:], x_BHTDh[..., :half]], dim=-1)
    return (x_BHTDh.float() * cos_TDh + rotated.float() * sin_TDh).type_as(x_BHTDh)


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    Rows may be left-padded to a common length: row b's first `pad_B[b]` slots hold no token.
    Those slots are masked out of attention and the row's positions count from its first real
    token, so a padded row computes what it would compute alone.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32,
                 pad_B: torch.Tensor | None = None) -> None:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pad_B = (torch.zeros(batch, dtype=torch.long, device=device) if pad_B is None
                      else pad_B.to(device=device, dtype=torch.long))
        self.cos_TDh, self.sin_TDh = rope_tables(max_len, cfg.head_dim, cfg.rope_theta, device)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (e.g. drop finished generations), in that order."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.pad_B = self.pad_B.index_select(0, rows)

    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row RoPE tables [B, 1, T, Dh] of slots start..start+length."""
        slots_T = torch.arange(start, start + length, device=self.pad_B.device)
        positions_BT = (slots_T[None, :] - self.pad_B[:, None]).clamp_min(0)
        return self.cos_TDh[positions_BT].unsqueeze(1), self.sin_TDh[positions_BT].unsqueeze(1)

    def mask(self, start: int, length: int) -> torch.Tensor:
        """Which cached slots each new query attends to: [B, 1, T, start + T], boolean."""
        device = self.pad_B.device
        query_T = torch.arange(start, start + length, device=device)
        key_S = torch.arange(start + length, device=device)
        causal_TS = key_S[None, :] <= query_T[:, None]
        real_BS = key_S[None, :] >= self.pad_B[:, None]
        # A padding query sees only itself: a row with nothing to attend to would give NaN, and NaN
        # in any token reaches every token through the MoE layer's shared expert buffers.
        itself_TS = key_S[None, :] == query_T[:, None]
        return ((causal_TS[None] & real_BS[:, None]) | itself_TS[None]).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(cfg.head_dim if per_head else cfg.n_heads * cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim if per_head else cfg.n_kv_heads * cfg.head_dim, eps=cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """cache: (keys, values, mask, start) of this layer: the new keys and values are written
        at slots start..start+T and the queries attend to slots 0..start+T under `mask`."""
        B, T, _ = x_BTD.shape
        q_BTHDh, k_BTGDh = self._normed_qk(self.wq(x_BTD), self.wk(x_BTD), B, T)
        q_BHTDh, k_BGTDh = q_BTHDh.transpose(1, 2), k_BTGDh.transpose(1, 2)
        v_BGTDh = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTDh, k_BGTDh = apply_rope(q_BHTDh, cos_TDh, sin_TDh), apply_rope(k_BGTDh, cos_TDh, sin_TDh)
        gqa = self.n_heads != self.n_kv_heads
        if cache is None:
            out_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, is_causal=True, enable_gqa=gqa)
        else:
            keys_BGSDh, values_BGSDh, mask_B1TS, start = cache
            keys_BGSDh[:, :, start:start + T] = k_BGTDh
            values_BGSDh[:, :, start:start + T] = v_BGTDh
            out_BHTDh = F.scaled_dot_product_attention(q_BHTDh, keys_BGSDh[:, :, :start + T],
                                                       values_BGSDh[:, :, :start + T], attn_mask=mask_B1TS,
                                                       enable_gqa=gqa)
        return self.wo(out_BHTDh.transpose(1, 2).reshape(B, T, -1))

    def _normed_qk(self, q_BTX: torch.Tensor, k_BTX: torch.Tensor, B: int, T: int):
        """Queries [B, T, H, Dh] and keys [B, T, G, Dh], through the q/k norms if the model has them."""
        if self.qk_norm == "proj":
            q_BTX, k_BTX = self.q_norm(q_BTX), self.k_norm(k_BTX)
        q_BTHDh = q_BTX.view(B, T, self.n_heads, self.head_dim)
        k_BTGDh = k_BTX.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BTHDh, k_BTGDh = self.q_norm(q_BTHDh), self.k_norm(k_BTGDh)
        return q_BTHDh, k_BTGDh


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, ep_size: int, ep_rank: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        if self.is_moe and cfg.moe_dispatch == "autoep":  # every expert here; AutoEP keeps this rank's
            self.ffn = StackedFeedForward(cfg.dim, cfg.expert_ffn_dim, cfg.experts_in_block(layer_id), cfg.top_k,
                                          cfg.score_func, cfg.normalize_routes)
        elif self.is_moe:
            num_experts = cfg.experts_in_block(layer_id)
            router = LossFreeRouter(cfg.dim, num_experts, cfg.top_k, cfg.score_func,
                                    cfg.normalize_routes, cfg.aux_loss_coef, groups=cfg.groups_in_block(layer_id))
            self.ffn = MoEFeedForward(cfg.dim, cfg.expert_ffn_dim, num_experts, cfg.top_k, router,
                                      ep_size=ep_size, ep_rank=ep_rank)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.dense_ffn_dim)

    def forward(self, x_BTD, cos_TDh, sin_TDh, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TDh, sin_TDh, cache)
        if self.is_moe:
            ffn_BTD, aux_loss = self.ffn(self.ffn_norm(x_BTD))
        else:
            ffn_BTD, aux_loss = self.ffn(self.ffn_norm(x_BTD)), x_BTD.new_zeros((), dtype=torch.float32)
        return x_BTD + ffn_BTD, aux_loss


def init_std(cfg: ModelConfig, name: str) -> float:
    """Standard deviation of the normal init of weight `name`: projections back into the residual
    stream (attention output, expert and dense down projections) are scaled by 1 / sqrt(2 n_layers)."""
    if name.endswith(("wo.weight", "w_down.weight")):
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


def _draw(cfg: ModelConfig, global_name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
    return torch.randn(shape, generator=gen) * init_std(cfg, global_name)


class Transformer(nn.Module):
    """forward(tokens [B, T]) -> (logits [B, T, V], auxiliary balance loss summed over layers).

    With a KVCache, forward(tokens, cache, start_pos) treats the tokens as slots
    start_pos..start_pos+T of the cached rows and stores their keys and values: prefill with the
    whole prompt at start_pos 0, then feed one token at a time.
    """

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
        """The legacy MoE blocks; moe.live.live_moe_layers gives every kind."""
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoEFeedForward)]

    @property
    def routers(self) -> list[LossFreeRouter]:
        return [ffn.router for ffn in self.moe_layers]

    def global_param_names(self) -> dict[str, str]:
        """Map each parameter name to its layout-independent name (experts by global id; a stacked
        block holds every expert, so its names are already global)."""
        global_ids = {moe_prefix(block_id): block.ffn.expert_ids
                      for block_id, block in enumerate(self.layers) if isinstance(block.ffn, MoEFeedForward)}
        mapping = {}
        for name, _ in self.named_parameters():
            parts = split_expert_param(name)
            mapping[name] = name if parts is None else with_expert_id(name, global_ids[parts[0]][parts[1]])
        return mapping

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seed every tensor by its global name, so the model is the same on any parallel layout
        (and with either expert layout: a stacked tensor is drawn slice by slice under the legacy names)."""
        for name, global_name in self.global_param_names().items():
            param = self.get_parameter(name)
            if "norm" in name:
                param.fill_(1.0)
                continue
            per_expert = legacy_expert_names(global_name, param.shape[0])
            if per_expert is None:
                param.copy_(_draw(self.cfg, legacy_name(global_name), param.shape, seed))
            else:
                for e, expert_name in enumerate(per_expert):
                    param[e].copy_(_draw(self.cfg, expert_name, param.shape[1:], seed))

    def forward(self, tokens_BT: torch.Tensor, cache: KVCache | None = None,
                start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        T = tokens_BT.shape[1]
        x_BTD = self.tok_embeddings(tokens_BT)
        if cache is None:
            cos_TDh, sin_TDh = rope_tables(T, self.cfg.head_dim, self.cfg.rope_theta, tokens_BT.device)
            mask = None
        else:
            if start_pos + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {start_pos + T}")
            cos_TDh, sin_TDh = cache.rope(start_pos, T)
            mask = cache.mask(start_pos, T)
        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        for layer_id, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[layer_id], cache.values[layer_id], mask, start_pos)
            x_BTD, layer_aux = block(x_BTD, cos_TDh, sin_TDh, layer_cache)
            aux_loss = aux_loss + layer_aux
        return self.output(self.norm(x_BTD)), aux_loss
