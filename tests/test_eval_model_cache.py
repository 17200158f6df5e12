"""The model's KV cache against plain full-sequence forward passes."""

import torch

from ds_upcycle.config import ModelConfig
from ds_upcycle.model import KVCache, Transformer

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=48,
                  expert_ffn_dim=24, num_experts=4, top_k=2, moe_layer_freq=2)


def model():
    return Transformer(CFG, seed=1).eval()


@torch.no_grad()
def test_incremental_decoding_matches_full_forward():
    net = model()
    tokens = torch.randint(0, 97, (3, 14), generator=torch.Generator().manual_seed(0))
    full, _ = net(tokens)
    cache = KVCache(CFG, 3, 20)
    pieces = [net(tokens[:, :6], cache, 0)[0]]                # prefill
    pieces += [net(tokens[:, i:i + 1], cache, i)[0] for i in range(6, 14)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padded_rows_compute_what_they_compute_alone():
    net = model()
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in (9, 4, 7)]
    width = 9
    batch = torch.stack([torch.cat([torch.full((width - len(r),), 5), r]) for r in rows])
    cache = KVCache(CFG, 3, width + 3, pad_B=torch.tensor([width - len(r) for r in rows]))
    logits, _ = net(batch, cache, 0)
    step = torch.randint(0, 97, (3, 1), generator=gen)
    next_logits, _ = net(step, cache, width)
    for i, row in enumerate(rows):
        alone, _ = net(torch.cat([row, step[i]])[None])
        torch.testing.assert_close(logits[i, width - len(row):], alone[0, :-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(next_logits[i, 0], alone[0, -1], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(logits[i]).all()  # padding slots too: NaN there would spread through MoE


@torch.no_grad()
def test_select_keeps_chosen_rows():
    net = model()
    tokens = torch.randint(0, 97, (3, 8), generator=torch.Generator().manual_seed(2))
    cache = KVCache(CFG, 3, 10)
    net(tokens[:, :7], cache, 0)
    cache.select(torch.tensor([2, 0]))
    last, _ = net(tokens[[2, 0], 7:8], cache, 7)
    full, _ = net(tokens[[2, 0]])
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_training_call_is_unchanged():
    logits, aux = model()(torch.randint(0, 97, (2, 5)))
    assert logits.shape == (2, 5, 97) and aux.shape == ()
