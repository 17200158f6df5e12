"""The transformer against direct computations."""

import math

import torch
import torch.nn.functional as F

from ds_upcycle.config import PRESETS, ModelConfig
from ds_upcycle.model import Attention, Transformer, apply_rope, rope_tables

SMALL = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=48,
                    expert_ffn_dim=24, num_experts=4, top_k=2, moe_layer_freq=2)


def test_causal_masking():
    model = Transformer(SMALL).eval()
    tokens = torch.randint(0, 97, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 97
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gqa_attention_matches_explicit_computation():
    torch.manual_seed(0)
    attn = Attention(SMALL)
    B, T, D, H, G, Dh = 2, 5, 32, 4, 2, 8
    x = torch.randn(B, T, D)
    cos, sin = rope_tables(T, Dh, SMALL.rope_theta, "cpu")
    assert attn.wq.weight.shape == (H * Dh, D) and attn.wk.weight.shape == (G * Dh, D)
    q = apply_rope((x @ attn.wq.weight.T).view(B, T, H, Dh).transpose(1, 2), cos, sin)
    k = apply_rope((x @ attn.wk.weight.T).view(B, T, G, Dh).transpose(1, 2), cos, sin)
    v = (x @ attn.wv.weight.T).view(B, T, G, Dh).transpose(1, 2)
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)  # head h uses kv head h // 2
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * Dh) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-6)


def test_rope_is_relative():
    # Rotating q and k by the same offset leaves their dot product unchanged.
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rope_tables(20, 8, 10000.0, "cpu")

    def dot(i, j):
        return (apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum()

    torch.testing.assert_close(dot(3, 1), dot(13, 11))


def test_layer_pattern_and_shapes():
    model = Transformer(SMALL)
    assert [b.is_moe for b in model.layers] == [False, True, False, True]
    logits, aux = model(torch.randint(0, 97, (3, 9)))
    assert logits.shape == (3, 9, 97) and aux.shape == ()
    full = Transformer(SMALL.replace(moe_layer_freq=1))
    assert all(b.is_moe for b in full.layers)


def test_tied_embeddings():
    model = Transformer(SMALL.replace(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight


def test_init_is_layout_independent():
    # Expert g holds the same weights whether this process has all experts or only half.
    whole = Transformer(SMALL, seed=3)
    half = Transformer(SMALL, ep_size=2, ep_rank=1, seed=3)
    whole_params = dict(whole.named_parameters())
    for name, global_name in half.global_param_names().items():
        torch.testing.assert_close(half.get_parameter(name), whole_params[global_name])
    assert half.moe_layers[0].expert_ids == [2, 3]
    experts = whole.moe_layers[0].local_experts
    assert not torch.equal(experts[0].w_up.weight, experts[1].w_up.weight)


def test_presets_build_configs():
    for name, cfg in PRESETS.items():
        assert cfg.moe_layer_ids, name
    assert PRESETS["paper-full"].num_experts == 256 and PRESETS["paper-full"].top_k == 8
    assert PRESETS["paper-il10"].n_layers == 10 and PRESETS["paper-il10"].moe_layer_freq == 2
    assert PRESETS["tiny"].moe_layer_freq == 1 and PRESETS["tiny-il"].moe_layer_freq == 2


def test_loss_falls_when_fitting_a_batch():
    torch.manual_seed(0)
    model = Transformer(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(30):
        logits, aux = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
