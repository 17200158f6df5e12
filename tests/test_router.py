"""The loss-free router against direct computations."""

import pytest
import torch
import torch.nn.functional as F

from ds_upcycle.moe.balance import balance_routers, bias_step, load_stats
from ds_upcycle.moe.layer import MoEFeedForward
from ds_upcycle.moe.router import LossFreeRouter
from ds_upcycle.upcycle.operator import LayerPlan, expand_router_bias, expand_rows, softmax_bias_scale


def make_router(E=6, K=2, D=16, score="sigmoid", normalize=True, seed=0):
    torch.manual_seed(seed)
    router = LossFreeRouter(D, E, K, score, normalize)
    torch.nn.init.normal_(router.wg.weight, std=0.5)
    return router


def test_selection_uses_bias_but_weights_do_not():
    router = make_router()
    x = torch.randn(32, 16)
    experts, weights, scores = router.route(x)
    # A large bias on expert 5 makes every token choose it...
    router.route_bias[5] = 10.0
    experts_b, weights_b, scores_b = router.route(x)
    assert (experts_b == 5).any(dim=1).all()
    assert not (experts == 5).any(dim=1).all()
    # ...but the weights are the unbiased scores of the chosen experts, normalised over them.
    chosen = torch.sigmoid(x @ router.wg.weight.T).gather(1, experts_b)
    torch.testing.assert_close(weights_b, chosen / chosen.sum(1, keepdim=True))
    torch.testing.assert_close(scores_b, scores)


def test_weights_normalised_over_chosen_experts():
    for score in ("sigmoid", "softmax"):
        router = make_router(E=8, K=3, score=score)
        _, weights, _ = router.route(torch.randn(50, 16))
        torch.testing.assert_close(weights.sum(1), torch.ones(50))
    # top-1 without normalisation keeps the raw score, so the router still gets a gradient
    router = make_router(K=1, normalize=False)
    x = torch.randn(10, 16)
    experts, weights, _ = router.route(x)
    torch.testing.assert_close(weights, torch.sigmoid(x @ router.wg.weight.T).gather(1, experts))


def test_route_tuple_is_dropless_and_consistent():
    router = make_router(E=4, K=2)
    router.route_bias[0] = 5.0  # every token routes to expert 0: a skewed load
    x = torch.randn(40, 16)
    _, capacity, num_experts, idx_KS, loc_KS, gates_KS, counts = router(x)
    assert num_experts == 4 and (idx_KS >= 0).all()
    assert int(capacity) == counts.max() == 40
    assert counts.sum() == 40 * 2
    # Each (expert, slot) pair is used by exactly one route.
    slots = idx_KS.long() * int(capacity) + loc_KS.long()
    assert slots.unique().numel() == slots.numel()
    assert (loc_KS < capacity).all()


def test_moe_layer_matches_dense_reference():
    torch.manual_seed(1)
    D, F_, E, K = 16, 24, 4, 2
    router = LossFreeRouter(D, E, K)
    torch.nn.init.normal_(router.wg.weight, std=0.5)
    layer = MoEFeedForward(D, F_, E, K, router)
    for expert in layer.local_experts:
        for p in expert.parameters():
            torch.nn.init.normal_(p, std=0.3)
    router.route_bias[2] = 0.3
    x = torch.randn(3, 7, D)
    out, _ = layer(x)
    flat = x.reshape(-1, D)
    experts, weights, _ = router.route(flat)
    expected = torch.zeros_like(flat)
    for s in range(flat.shape[0]):
        for k in range(K):
            expert = layer.local_experts[experts[s, k]]
            expected[s] += weights[s, k] * expert(flat[s:s + 1])[0]
    torch.testing.assert_close(out.reshape(-1, D), expected, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_router_and_experts():
    router = make_router(E=4, K=2, D=8)
    layer = MoEFeedForward(8, 16, 4, 2, router)
    out, _ = layer(torch.randn(2, 5, 8))
    out.square().sum().backward()
    assert router.wg.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.local_experts.parameters())


def test_load_counted_only_in_training():
    router = make_router(E=4, K=2)
    x = torch.randn(30, 16)
    router.train()
    router(x)
    router(x)
    assert router.route_load.sum() == 2 * 30 * 2
    router.eval()
    router(x)
    assert router.route_load.sum() == 2 * 30 * 2


def test_bias_update_direction():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 30.0, 20.0, 20.0])  # mean 20
    new = bias_step(bias, load, 1e-3)
    torch.testing.assert_close(new, torch.tensor([1e-3, -1e-3, 0.0, 0.0]))


def test_balance_routers_uses_reduced_load_and_resets():
    routers = [make_router(E=4), make_router(E=4, seed=1)]
    routers[0].route_load.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    routers[1].route_load.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    seen = []

    def reduce(t):  # stands in for the all-reduce over ranks: adds 10 to one expert's load
        seen.append(t.clone())
        return t + torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0])

    stats = balance_routers(routers, 0.5, reduce)
    assert len(seen) == 1 and seen[0].shape == (8,)   # one collective for all layers
    torch.testing.assert_close(routers[0].route_bias, torch.tensor([0.5, 0.5, 0.5, -0.5]))
    torch.testing.assert_close(routers[1].route_bias, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    assert all(r.route_load.sum() == 0 for r in routers)
    assert abs(stats[0]["max_share"] - 14 / 20) < 1e-6


def test_load_stats():
    stats = load_stats(torch.tensor([1.0, 1.0, 2.0]))
    assert abs(stats["min_share"] - 0.25) < 1e-6 and abs(stats["max_share"] - 0.5) < 1e-6
    mean, std = 4 / 3, torch.tensor([1.0, 1.0, 2.0]).std(unbiased=False).item()
    assert abs(stats["cv"] - std / mean) < 1e-6


def test_aux_loss_optional():
    router = make_router(E=4, K=2)
    x = torch.randn(20, 16)
    assert router(x)[0] == 0
    router.aux_loss_coef = 0.01
    aux = router(x)[0]
    experts, _, scores = router.route(x)
    share = F.one_hot(experts, 4).sum((0, 1)).float() / (20 * 2)
    probs = (scores / scores.sum(1, keepdim=True)).mean(0)
    torch.testing.assert_close(aux, 0.01 * 4 * (share * probs).sum())


def test_route_bias_stays_fp32_under_bf16_cast():
    router = make_router()
    router.to(torch.bfloat16)
    assert router.wg.weight.dtype == torch.bfloat16
    assert router.route_bias.dtype == torch.float32
    assert "route_bias" in router.state_dict() and "route_load" not in router.state_dict()


def test_balance_routers_of_different_sizes():
    """Layers grown by different amounts (expand --layers) have routers of different sizes."""
    routers = [make_router(E=4), make_router(E=6, seed=1)]
    routers[0].route_load.copy_(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    routers[1].route_load.copy_(torch.tensor([0.0, 2.0, 2.0, 2.0, 2.0, 4.0]))
    stats = balance_routers(routers, 0.25, lambda t: t * 2)
    torch.testing.assert_close(routers[0].route_bias, torch.tensor([0.25, 0.25, 0.25, -0.25]))
    torch.testing.assert_close(routers[1].route_bias, torch.tensor([0.25, 0.0, 0.0, 0.0, 0.0, -0.25]))
    assert [len(s["shares"]) for s in stats] == [4, 6]


def test_distinct_groups_take_one_copy_of_an_expert():
    """Experts 0/2 and 1/3 are copies (groups 0 and 1) with a third group 2: top-2 never takes both copies."""
    router = LossFreeRouter(4, 5, 2, groups=(0, 1, 0, 1, 2))
    biased = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3],     # plain top-2 would take 0 and 2
                           [0.1, 0.5, 0.2, 0.6, 0.55],    # best of group 1 is expert 3, then group 2
                           [0.4, 0.4, 0.4, 0.4, 0.0]])    # ties inside a group: the lower id
    chosen = router._top_k_distinct_groups(biased)
    assert [sorted(row) for row in chosen.tolist()] == [[0, 4], [3, 4], [0, 1]]
    assert LossFreeRouter(4, 5, 2).route_group is None   # without groups the router is plain top-K


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_distinct_groups_preserve_the_source_layer_exactly(score):
    """A layer of 3 experts doubled with groups computes what the 3-expert layer computed.

    Softmax scores halve when every expert has two copies (the denominator sums over six), so the
    selection bias is halved with them (operator.softmax_bias_scale); sigmoid scores do not change.
    """
    torch.manual_seed(0)
    source = LossFreeRouter(8, 3, 2, score)
    torch.nn.init.normal_(source.wg.weight, std=0.3)
    source.route_bias.copy_(torch.tensor([0.04, -0.03, 0.01]))
    plan = LayerPlan(3, (0, 1, 2, 0, 1, 2))
    doubled = LossFreeRouter(8, 6, 2, score, groups=(0, 1, 2, 0, 1, 2))
    scale = softmax_bias_scale(plan) if score == "softmax" else 1.0
    with torch.no_grad():
        doubled.wg.weight.copy_(torch.cat([source.wg.weight, source.wg.weight]))
        # copies a little less attractive than their source: every group is chosen as before
        doubled.route_bias.copy_(expand_router_bias(source.route_bias, plan, 0.0, torch.Generator(), scale)
                                 - torch.tensor([0.0, 0.0, 0.0, 1e-4, 2e-4, 3e-4]))
    x = torch.randn(256, 8)
    src_experts, src_weights, _ = source.route(x)
    experts, weights, _ = doubled.route(x)
    assert torch.equal(experts, src_experts)
    torch.testing.assert_close(weights, src_weights, rtol=1e-6, atol=1e-7)
    if score == "softmax":  # the bias unscaled: the biased choice is no longer the source's
        with torch.no_grad():
            doubled.route_bias.copy_(expand_rows(source.route_bias, plan))
        assert not torch.equal(doubled.route(x)[0], src_experts)
    plain = LossFreeRouter(8, 6, 2)   # the same rows without groups: copies tie, top-2 takes both
    with torch.no_grad():
        plain.wg.weight.copy_(doubled.wg.weight)
    assert torch.equal(plain.route(x)[0] % 3, plain.route(x)[0][:, :1].expand(-1, 2) % 3)


def test_an_unknown_score_function_is_refused():
    with pytest.raises(ValueError, match="score_func must be one of"):
        LossFreeRouter(8, 4, 2, score_func="relu")
