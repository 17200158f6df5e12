"""The upcycling operator alone, against hand-made inputs."""

import pytest
import torch

from ds_upcycle.errors import UserError
from ds_upcycle.upcycle.operator import (LayerExpansion, LayerPlan, allocate_copies, copy_moment, expand_router,
                                         expand_router_bias, expand_rows, place_copies, plan_layer, replica_mask,
                                         split_router_rows)
from ds_upcycle.trained.scores import GradientStats, expert_score


@pytest.mark.parametrize("E,N", [(4, 8), (4, 12), (3, 7), (8, 9), (5, 5)])
def test_uniform_counts_sum_to_target(E, N):
    counts = allocate_copies(E, N)
    assert sum(counts) == N and min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_utility_allocation_is_proportional_greedy():
    # 3 extra slots: expert 0 (score 9) gets 2 (9/1 > 9/2=4.5 > 4 > 9/3), expert 1 gets 1.
    assert allocate_copies(3, 6, [9.0, 4.0, 1.0]) == [3, 2, 1]
    # with replacement: one dominant expert takes every extra slot...
    assert allocate_copies(4, 8, [100.0, 1.0, 1.0, 1.0]) == [5, 1, 1, 1]
    # ...unless capped
    assert allocate_copies(4, 8, [100.0, 1.0, 1.0, 1.0], max_copies=3) == [3, 2, 2, 1]
    # equal scores give the uniform allocation; ties go to the lower id
    assert allocate_copies(4, 6, [2.0] * 4) == allocate_copies(4, 6) == [2, 2, 1, 1]
    assert allocate_copies(2, 5, [0.0, 0.0]) == [3, 2]


def test_rank_fill_is_the_authors_rule():
    # Only the order matters: the best expert takes up to 4 copies (3 extra), then the next.
    assert allocate_copies(4, 8, [1.0, 1.1, 0.9, 1.05], rule="rank") == [1, 4, 1, 2]
    assert allocate_copies(4, 8, [9.0, 4.0, 1.0, 0.5], rule="rank") == [4, 2, 1, 1]
    # 32 -> 64: eleven experts copied (ten to 4 copies, one to 3), 21 left single
    counts = allocate_copies(32, 64, [float(32 - i) for i in range(32)], rule="rank")
    assert counts[:11] == [4] * 10 + [3] and counts[11:] == [1] * 21
    # proportional spreads similar scores evenly; rank does not
    assert allocate_copies(4, 8, [1.0, 1.1, 0.9, 1.05]) == [2, 2, 2, 2]
    # ties: the lower id ranks first
    assert allocate_copies(4, 6, [2.0] * 4, rule="rank") == [3, 1, 1, 1]
    # the cap is --max-copies when given...
    assert allocate_copies(4, 8, [9.0, 4.0, 1.0, 0.5], max_copies=2, rule="rank") == [2, 2, 2, 2]
    assert allocate_copies(4, 8, [9.0, 4.0, 1.0, 0.5], max_copies=3, rule="rank") == [3, 3, 1, 1]
    # ...and refused where it cannot reach the target; the default cap of 4 rises to what the target needs
    with pytest.raises(UserError, match="max_copies 2: 2 copies of each of 4 experts make at most 8 experts, not 12"):
        allocate_copies(4, 12, [9.0, 4.0, 1.0, 0.5], max_copies=2, rule="rank")
    assert allocate_copies(4, 24, [9.0, 4.0, 1.0, 0.5], rule="rank") == [6, 6, 6, 6]
    assert allocate_copies(4, 20, [9.0, 4.0, 1.0, 0.5], rule="rank") == [5, 5, 5, 5]
    # without scores (--select uniform) every rule is uniform
    assert allocate_copies(4, 8, rule="rank") == [2, 2, 2, 2]
    assert plan_layer(4, 8, [9.0, 4.0, 1.0, 0.5], rule="rank").counts == [4, 2, 1, 1]


def test_relative_router_noise_scales_with_the_replicas_biases():
    plan = LayerPlan(3, (0, 1, 2, 0, 1))  # replicas at new ids 3 (of 0) and 4 (of 1)
    bias = torch.tensor([0.5, -0.5, 2.0])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    absolute = expand_router_bias(bias, plan, 0.1, gen())
    relative = expand_router_bias(bias, plan, 0.1, gen(), relative=True)
    spread = torch.tensor([0.5, -0.5], dtype=torch.float64).std()  # sample std of the copied biases
    noise = torch.randn(2, generator=gen(), dtype=torch.float64)
    torch.testing.assert_close(absolute[3:].double(), torch.tensor([0.5, -0.5], dtype=torch.float64) + 0.1 * noise,
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(relative[3:].double(),
                               torch.tensor([0.5, -0.5], dtype=torch.float64) + 0.1 * spread * noise,
                               rtol=0, atol=1e-7)
    assert torch.equal(relative[:3], bias)
    # equal biases (a fresh bias): no relative noise at all, as in the authors' code
    equal = torch.full((3,), 0.25)
    assert torch.equal(expand_router_bias(equal, plan, 0.1, gen(), relative=True), expand_rows(equal, plan))
    # on router rows (no bias) it is relative to the spread of the replicas' row entries
    rows = torch.tensor([[1.0, -1.0], [3.0, 1.0], [0.0, 0.0]])
    out, _ = expand_router(rows, None, LayerExpansion(plan, noise_on="rows"), 0.1, gen(), relative=True)
    entries = torch.tensor([[1.0, -1.0], [3.0, 1.0]], dtype=torch.float64)
    expected = entries + 0.1 * entries.std() * torch.randn(2, 2, generator=gen(), dtype=torch.float64)
    torch.testing.assert_close(out[3:].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(out[:3], rows)


def test_fresh_optimizer_state_keeps_no_moment():
    plan = LayerPlan(2, (0, 1, 0))
    m = torch.ones(3)
    assert all(copy_moment(m, plan, slot, moment, "fresh") is None for slot in range(3) for moment in (1, 2))
    assert expand_rows(torch.ones(2, 2), plan, moment=1, mode="fresh").abs().sum() == 0
    assert expand_rows(torch.ones(2, 2), plan, moment=0, mode="fresh").tolist() == [[1, 1]] * 3


def test_allocation_errors():
    with pytest.raises(UserError, match="fewer than"):
        allocate_copies(4, 3)
    with pytest.raises(UserError, match="max_copies 2: 2 copies of each of 4 experts make at most 8 experts, not 12"):
        allocate_copies(4, 12, max_copies=2)
    with pytest.raises(UserError, match="non-negative"):
        allocate_copies(2, 4, [1.0, float("nan")])


def test_placement_is_copy_major_on_one_rank():
    assert place_copies([2, 2, 2]) == [0, 1, 2, 0, 1, 2]
    assert place_copies([3, 1, 2]) == [0, 1, 2, 0, 2, 0]
    assert replica_mask([0, 1, 2, 0, 2, 0]).tolist() == [False, False, False, True, True, True]


def test_placement_balances_expert_parallel_ranks():
    plan = plan_layer(4, 8, ep_size=2)
    # uniform: each rank holds one copy of every expert, half of the tokens each
    assert plan.sources == (0, 1, 2, 3, 0, 1, 2, 3)
    assert plan.rank_loads(2) == [0.5, 0.5]
    assert plan_layer(4, 8, ep_size=4).rank_loads(4) == pytest.approx([0.25] * 4)
    # skewed counts: the single-copy experts 1 and 2 go to different ranks
    skewed = plan_layer(4, 12, [100.0, 2.0, 1.0, 30.0], ep_size=2)
    assert skewed.counts == [7, 1, 1, 3]
    ranks = [set(skewed.sources[:6]), set(skewed.sources[6:])]
    assert (1 in ranks[0]) != (2 in ranks[0])
    loads = skewed.rank_loads(2)
    assert abs(loads[0] - loads[1]) < 0.1
    # the naive copy-major order would have put both on rank 0
    naive = LayerPlan(4, tuple(place_copies(skewed.counts)))
    assert abs(naive.rank_loads(2)[0] - naive.rank_loads(2)[1]) > 0.4
    assert sorted(skewed.sources) == sorted(naive.sources)


def test_same_expert_count_keeps_experts_in_place():
    # a reshard (or a layer left out of an expansion) must not permute experts over ranks
    for ep_size in (1, 2, 4):
        plan = plan_layer(4, 4, [3.0, 1.0, 2.0, 0.5], ep_size=ep_size)
        assert plan.sources == (0, 1, 2, 3) and not plan.replicas.any()


def test_rank_loads_with_given_source_loads():
    skewed = LayerPlan(2, (0, 1, 0, 0))
    assert skewed.counts == [3, 1] and skewed.rank_loads(2) == pytest.approx([0.5 / 3 + 0.5, 1 / 3])
    assert skewed.rank_loads(1, [3.0, 1.0]) == pytest.approx([1.0])


def test_expand_rows_copies_exactly():
    torch.manual_seed(0)
    weights = torch.randn(3, 5, 4)
    plan = plan_layer(3, 7, [3.0, 2.0, 1.0])
    new = expand_rows(weights, plan)
    assert new.shape == (7, 5, 4)
    for j, src in enumerate(plan.sources):
        assert torch.equal(new[j], weights[src])
    assert torch.equal(new[:3], weights)  # source experts keep their ids and values


def test_optimizer_state_modes():
    plan = LayerPlan(2, (0, 1, 0))  # expert 0 has 2 copies
    m = torch.tensor([[2.0, 2.0], [3.0, 3.0]])
    assert expand_rows(m, plan, moment=1, mode="copy").tolist() == [[2, 2], [3, 3], [2, 2]]
    assert expand_rows(m, plan, moment=1, mode="reset").tolist() == [[2, 2], [3, 3], [0, 0]]
    assert expand_rows(m, plan, moment=1, mode="scale").tolist() == [[1, 1], [3, 3], [1, 1]]
    assert expand_rows(m, plan, moment=2, mode="scale").tolist() == [[0.5, 0.5], [3, 3], [0.5, 0.5]]
    assert expand_rows(m, plan, moment=0, mode="reset").tolist() == [[2, 2], [3, 3], [2, 2]]


def test_router_bias_noise_only_on_replicas_and_seeded():
    plan = plan_layer(4, 10)
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3])
    new = expand_router_bias(bias, plan, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(new[:4], bias)  # source experts unchanged
    replicas = plan.replicas
    diffs = new[replicas] - bias[torch.tensor(plan.sources)[replicas]]
    assert (diffs != 0).all() and diffs.abs().max() < 0.1
    again = expand_router_bias(bias, plan, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(new, again)
    other = expand_router_bias(bias, plan, 0.01, torch.Generator().manual_seed(1))
    assert not torch.equal(new, other)
    # all-equal (fresh) bias still gets noise; a missing bias counts as zeros
    fresh = expand_router_bias(None, plan, 0.01, torch.Generator().manual_seed(0))
    assert (fresh[replicas] != 0).all() and (fresh[~replicas] == 0).all()
    assert expand_router_bias(bias, plan, 0.0, torch.Generator()).tolist() == expand_rows(bias, plan).tolist()


def test_scores_on_hand_made_state():
    w = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0])}
    m = {"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([-1.0])}
    v = {"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([4.0])}
    stats = GradientStats.from_adam(w, m, v)
    assert expert_score("grad_sq", stats) == pytest.approx(9.0)
    assert expert_score("saliency", stats) == pytest.approx(abs(0.5 - 1.0 - 3.0))
    assert expert_score("weight_norm", stats) == pytest.approx(14 ** 0.5)
    assert expert_score("fisher", stats) == pytest.approx(0.25 / 1 + 0.25 / 4 + 1.0 / 4)
    with pytest.raises(ValueError, match="unknown selection rule"):
        expert_score("random", stats)


def test_each_rule_changes_the_plan():
    # Expert 1 has the biggest gradients, expert 2 the biggest weights.
    experts = [
        GradientStats.from_adam({"w": torch.ones(4)}, {"w": torch.full((4,), 0.1)}, {"w": torch.full((4,), 0.01)}),
        GradientStats.from_adam({"w": torch.ones(4)}, {"w": torch.full((4,), 1.0)}, {"w": torch.full((4,), 2.0)}),
        GradientStats.from_adam({"w": torch.full((4,), 5.0)}, {"w": torch.zeros(4)}, {"w": torch.full((4,), 0.02)}),
    ]
    top = {rule: max(range(3), key=lambda i: expert_score(rule, experts[i]))
           for rule in ("grad_sq", "saliency", "weight_norm", "fisher")}
    assert top == {"grad_sq": 1, "saliency": 1, "weight_norm": 2, "fisher": 0}
    plan = plan_layer(3, 4, [expert_score("grad_sq", e) for e in experts])
    assert plan.counts == [1, 2, 1] and plan.sources == (0, 1, 2, 1)


def test_split_router_rows_spreads_each_experts_copies_along_its_direction():
    plan = LayerPlan(2, (0, 1, 0, 1, 0))  # expert 0: copies at new ids 0, 2, 4; expert 1: ids 1, 3
    rows = expand_rows(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]), plan)
    directions = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])
    offsets = torch.tensor([0.5, 2.0])
    out = split_router_rows(rows, plan, directions, offsets)
    # copy k of c copies moves by (k - (c - 1) / 2) * offset along the direction
    expected = torch.stack([rows[0] - 0.5 * directions[0], rows[1] - 0.5 * 2.0 * directions[1],
                            rows[2] + 0.0 * directions[0], rows[3] + 0.5 * 2.0 * directions[1],
                            rows[4] + 0.5 * directions[0]])
    torch.testing.assert_close(out, expected)
    assert torch.equal(rows, expand_rows(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]), plan))  # input kept
    single = LayerPlan(2, (0, 1))  # one copy each: nothing moves
    torch.testing.assert_close(split_router_rows(rows[:2], single, directions, offsets), rows[:2])
    with pytest.raises(ValueError):
        split_router_rows(rows, plan, directions[:1], offsets)
