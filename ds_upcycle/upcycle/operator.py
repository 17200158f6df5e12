"""The expert-upcycling operator: pure functions, tensors in, tensors and a plan out.

For one MoE layer with E source experts and a target of N > E experts:

1. `allocate_copies` chooses replication counts c_i >= 1 with sum c_i = N, uniformly or from
   per-expert utility scores;
2. `place_copies` orders the N new experts so that expected load is balanced over the target's
   expert-parallel ranks (with one rank, new ids 0..E-1 are the source experts themselves);
3. `expand_rows` builds any per-expert tensor (expert weights, router rows, their optimizer
   moments) for the new experts, `copy_moment` one new expert's Adam moment; `expand_router` a
   layer's router: its rows, and its routing bias with N(0, sigma^2) noise on the replicas only,
   so that the source experts' routing is unchanged (a router without a bias gets the noise on the
   replicas' rows);
4. the symmetry-breaking variants: routing groups for distinct copies (`copy_groups`) and copies
   pulled apart along their tokens' main direction (`split_directions`, `split_router_rows`);
   and the paper's negative baselines, replicas partly or wholly redrawn (`redrawn_units`).

It knows nothing of files, DeepSpeed or ranks: tensors and plans in, tensors out.

Shape suffixes: E source experts, N new experts, D router input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..choices import ALLOCATIONS, OPTIMIZER_STATE_MODES
from ..config import check_expert_parallel
from ..errors import UserError

# The authors' rank fill gives one expert at most 3 extra copies (their max_duplicates_per_expert).
RANK_FILL_CAP = 4


def allocate_copies(num_experts: int, target: int, scores: Sequence[float] | None = None,
                    max_copies: int | None = None, rule: str = "proportional") -> list[int]:
    """Replication counts c_i (>= 1, sum = target).

    Without scores every expert gets target // E copies and the remainder goes to the lowest ids,
    whatever the rule. With scores, every expert starts with one copy and the target - E extra
    slots are handed out as `rule` says (see proportional_fill and rank_fill). `max_copies` caps
    any c_i; a cap that cannot reach the target is refused.
    """
    if target < num_experts:
        raise UserError(f"target of {target} experts is fewer than the {num_experts} source experts")
    if rule not in ALLOCATIONS:
        raise ValueError(f"unknown allocation rule {rule!r}")
    if max_copies is None:
        # The rank fill's own cap, raised where it could not reach the target (the authors only double).
        cap = max(RANK_FILL_CAP, -(-target // num_experts)) if rule == "rank" and scores is not None else target
    else:
        cap = max_copies
    if cap < 1 or cap * num_experts < target:
        raise UserError(f"max_copies {cap}: {cap} copies of each of {num_experts} experts make at most "
                        f"{cap * num_experts} experts, not {target}")
    if scores is None:
        base, extra = divmod(target, num_experts)
        return [base + (i < extra) for i in range(num_experts)]
    if len(scores) != num_experts:
        raise ValueError(f"{len(scores)} scores for {num_experts} experts")
    if any(not (s >= 0) for s in scores):  # also catches NaN
        raise UserError("utility scores must be finite and non-negative")
    fill = rank_fill if rule == "rank" else proportional_fill
    return fill(scores, target, cap)


def proportional_fill(scores: Sequence[float], target: int, cap: int) -> list[int]:
    """Extra slots one at a time, with replacement, to the expert with the highest score per copy,
    s_i / c_i (a copy shares its expert's utility with the other copies); ties go to the expert
    with fewer copies, then to the lower id. A proportional (D'Hondt) apportionment: experts of
    similar scores get similar counts."""
    counts = [1] * len(scores)
    for _ in range(target - len(scores)):
        open_ids = [i for i in range(len(scores)) if counts[i] < cap]
        best = max(open_ids, key=lambda i: (scores[i] / counts[i], -counts[i], -i))
        counts[best] += 1
    return counts


def rank_fill(scores: Sequence[float], target: int, cap: int) -> list[int]:
    """The paper's authors' rule: experts ranked by score (ties: the lower id first), the best one
    filled up to `cap` copies, then the next, until the target is reached; the rest keep one copy.
    Only the order of the scores matters: 4 -> 8 with cap 4 gives [4, 2, 1, 1] in rank order
    however close the scores are, 32 -> 64 copies 11 experts and leaves 21 single."""
    counts = [1] * len(scores)
    extra = target - len(scores)
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        take = min(cap - 1, extra)
        counts[i] += take
        extra -= take
    return counts


def place_copies(counts: Sequence[int], ep_size: int = 1, loads: Sequence[float] | None = None) -> list[int]:
    """Source expert of every new expert id, balancing expected load over expert-parallel ranks.

    Rank p of `ep_size` holds new ids [p * N/P, (p + 1) * N/P). Each copy of expert i is expected to
    carry loads[i] / c_i (source loads uniform unless given); copies are assigned heaviest first to
    the least-loaded rank with a free slot (longest-processing-time scheduling), so the copies of
    an expert spread over ranks and no rank gets all the experts that have a single copy. Within
    a rank, ids are copy-major (first copies by source id, then second copies, ...); with one rank
    this makes new ids 0..E-1 the source experts themselves.
    """
    num_target = sum(counts)
    check_expert_parallel(ep_size, [num_target])
    loads = list(loads) if loads is not None else [1.0] * len(counts)
    slots_per_rank = num_target // ep_size
    copies = sorted(((loads[i] / c, i, k) for i, c in enumerate(counts) for k in range(c)),
                    key=lambda item: (-item[0], item[1], item[2]))
    rank_load, rank_copies = [0.0] * ep_size, [[] for _ in range(ep_size)]
    for weight, expert, copy in copies:
        rank = min((r for r in range(ep_size) if len(rank_copies[r]) < slots_per_rank),
                   key=lambda r: (rank_load[r], r))
        rank_load[rank] += weight
        rank_copies[rank].append((copy, expert))
    return [expert for held in rank_copies for _, expert in sorted(held)]


def replica_mask(sources: Sequence[int]) -> torch.Tensor:
    """True for new experts that are copies (every occurrence of a source after its first)."""
    seen: set[int] = set()
    mask = []
    for src in sources:
        mask.append(src in seen)
        seen.add(src)
    return torch.tensor(mask, dtype=torch.bool)


@dataclass(frozen=True)
class LayerPlan:
    """How one MoE layer grows: `sources[j]` is the source expert copied into new expert j."""

    num_source: int
    sources: tuple[int, ...]
    scores: tuple[float, ...] | None = None

    @property
    def num_target(self) -> int:
        return len(self.sources)

    @property
    def counts(self) -> list[int]:
        return [self.sources.count(i) for i in range(self.num_source)]

    @property
    def replicas(self) -> torch.Tensor:
        return replica_mask(self.sources)

    def rank_loads(self, ep_size: int, source_loads: Sequence[float] | None = None) -> list[float]:
        """Expected share of tokens on each expert-parallel rank of the new layer, assuming each
        source expert's load (uniform if not given) splits evenly among its copies."""
        loads = list(source_loads) if source_loads is not None else [1.0] * self.num_source
        total = sum(loads)
        counts = self.counts
        per_rank = self.num_target // ep_size
        shares = [0.0] * ep_size
        for new_id, src in enumerate(self.sources):
            shares[new_id // per_rank] += loads[src] / counts[src] / total
        return shares

    def to_dict(self) -> dict:
        return {"num_source": self.num_source, "num_target": self.num_target, "sources": list(self.sources),
                "counts": self.counts, "scores": list(self.scores) if self.scores is not None else None}


def plan_layer(num_experts: int, target: int, scores: Sequence[float] | None = None,
               max_copies: int | None = None, ep_size: int = 1, rule: str = "proportional") -> LayerPlan:
    counts = allocate_copies(num_experts, target, scores, max_copies, rule)
    # Nothing to balance without copies: keep every expert at its id (a reshard leaves experts in place).
    sources = range(num_experts) if target == num_experts else place_copies(counts, ep_size)
    return LayerPlan(num_experts, tuple(sources), tuple(scores) if scores is not None else None)



def moment_factor(plan: LayerPlan, slot: int, moment: int, mode: str) -> float:
    """Factor on new expert `slot`'s copy of its source's Adam moment (1: exp_avg, 2: exp_avg_sq).

    "copy": replicas inherit the source's moments (factor 1); "reset": replicas start at zero;
    "scale": every copy of expert i gets (1/c_i)**moment, since each copy can expect about 1/c_i of
    its expert's tokens and so of its gradient; "fresh": no moments for any parameter (factor 0
    here; the checkpoint is then written without optimizer state, see expand.py). Weights
    (moment 0) are always copied exactly.
    """
    if mode not in OPTIMIZER_STATE_MODES:
        raise ValueError(f"unknown optimizer-state mode {mode!r}")
    if moment == 0 or mode == "copy":
        return 1.0
    if mode == "fresh":
        return 0.0
    if mode == "reset":
        return 0.0 if bool(plan.replicas[slot]) else 1.0
    return (1.0 / plan.counts[plan.sources[slot]]) ** moment


def expand_rows(tensor: torch.Tensor, plan: LayerPlan, moment: int = 0, mode: str = "copy") -> torch.Tensor:
    """Per-expert tensor (experts along dim 0) for the new experts; see `moment_factor`."""
    if tensor.shape[0] != plan.num_source:
        raise ValueError(f"tensor has {tensor.shape[0]} rows for {plan.num_source} experts")
    out = tensor[torch.tensor(plan.sources)].clone()
    factors = torch.tensor([moment_factor(plan, j, moment, mode) for j in range(plan.num_target)],
                           dtype=torch.float64)
    if bool((factors != 1).any()):
        out = out * factors.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
    return out


def softmax_bias_scale(plan: LayerPlan) -> float:
    """How much a softmax router's scores shrink when the layer grows: its denominator sums over
    every copy, so with c copies of every expert each score is exactly 1/c of the source's; with
    unequal copy counts the factor depends on the token, and the mean ratio E/N stands in for it."""
    return plan.num_source / plan.num_target


def replica_noise(values_N: torch.Tensor, plan: LayerPlan, noise_std: float, generator: torch.Generator,
                  relative: bool = False) -> torch.Tensor:
    """`values_N` (one row per new expert, fp64) with N(0, sigma^2) noise added to the replicas' rows.

    sigma is `noise_std`, or with `relative` noise_std times the sample standard deviation of the
    replicas' copied values (the authors' rule: 0 where those values are all equal, as a fresh
    routing bias is, or where there is only one).
    """
    replicas = plan.replicas
    copied = values_N[replicas]
    sigma = noise_std
    if relative:
        sigma *= float(copied.std()) if copied.numel() > 1 else 0.0
    out = values_N.clone()
    if sigma > 0:
        out[replicas] = copied + torch.randn(copied.shape, generator=generator, dtype=torch.float64) * sigma
    return out


def expand_router_bias(bias: torch.Tensor | None, plan: LayerPlan, noise_std: float,
                       generator: torch.Generator, scale: float = 1.0, relative: bool = False) -> torch.Tensor:
    """Routing bias of the new experts: copied and multiplied by `scale`, plus N(0, sigma^2) on
    the replicas only (sigma: replica_noise).

    The bias is added to the scores to choose experts, so it must shrink as the scores do:
    `scale` is softmax_bias_scale for a softmax router (the biased choice is then the source's
    whenever every expert has the same number of copies) and 1 for sigmoid, whose scores do not
    change. The noise breaks the exact ties between an expert and its copies in top-K selection;
    absolute noise is non-zero even when the biases are all equal (e.g. a freshly initialised
    bias), relative noise is not. A missing bias counts as zeros.
    """
    if bias is None:
        bias = torch.zeros(plan.num_source)
    new = (expand_rows(bias.float(), plan) * scale).double()
    return replica_noise(new, plan, noise_std, generator, relative).to(bias.dtype)


def split_router_rows(rows_ND: torch.Tensor, plan: LayerPlan, directions_ED: torch.Tensor,
                      offsets_E: torch.Tensor) -> torch.Tensor:
    """Router rows of the new experts with the copies of each expert pulled apart along a direction.

    The "split a codeword" step of vector quantisation (LBG): copy k of the c_i copies of expert i
    gets w_i + (k - (c_i - 1) / 2) * offsets_E[i] * directions_ED[i], so the copies' logits differ by
    a multiple of d_i . x and, under group routing (a token takes one copy of an expert), the copy a
    token goes to depends on where the token lies along d_i: with c_i = 2, on the sign of d_i . x.
    `rows_ND` are the expanded rows (expand_rows); experts with one copy are unchanged.
    """
    if directions_ED.shape != (plan.num_source, rows_ND.shape[1]) or offsets_E.shape != (plan.num_source,):
        raise ValueError(f"need one direction of length {rows_ND.shape[1]} and one offset per source expert")
    out = rows_ND.clone()
    counts, seen = plan.counts, [0] * plan.num_source
    for new_id, src in enumerate(plan.sources):
        position = seen[src] - (counts[src] - 1) / 2
        seen[src] += 1
        shift = position * offsets_E[src].double() * directions_ED[src].double()
        out[new_id] = (out[new_id].double() + shift).to(out.dtype)
    return out


def split_offsets(split: SplitDirections, scale: float) -> torch.Tensor:
    """How far along its direction each expert's copies move apart: `scale` router-logit units
    between neighbouring copies for a token one spread from the middle (0 where the spread is 0)."""
    return torch.where(split.spread_E > 0, scale / split.spread_E.clamp_min(1e-12), 0.0)


@dataclass(frozen=True)
class SplitDirections:
    """Per source expert of one MoE layer: the direction along which its tokens vary most, made
    orthogonal to their mean (so that d . x changes sign near the middle of the expert's tokens),
    and the standard deviation of d . x over those tokens."""

    directions_ED: torch.Tensor
    spread_E: torch.Tensor
    tokens_E: torch.Tensor


def split_directions(count_E: torch.Tensor, sum_ED: torch.Tensor, outer_EDD: torch.Tensor) -> SplitDirections:
    """SplitDirections from the moments of the router inputs each expert was chosen for.

    count_E tokens, sum_ED their sum and outer_EDD the sum of their outer products give expert i's
    mean mu_i and covariance C_i; d_i is C_i's top eigenvector with its mu_i component removed,
    normalised. An expert with fewer than two tokens keeps a zero direction (its copies are not split).
    """
    E, D = sum_ED.shape
    directions, spreads = torch.zeros(E, D, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for i in range(E):
        n = float(count_E[i])
        if n < 2:
            continue
        mean = sum_ED[i] / n
        cov = outer_EDD[i] / n - torch.outer(mean, mean)
        _, vectors = torch.linalg.eigh(cov)
        d = vectors[:, -1]
        if mean.norm() > 0:
            unit = mean / mean.norm()
            d = d - (d @ unit) * unit
        if d.norm() == 0:
            continue
        d = d / d.norm()
        directions[i], spreads[i] = d, (d @ cov @ d).clamp_min(0).sqrt()
    return SplitDirections(directions.float(), spreads.float(), count_E.float())


def copy_groups(groups_E: Sequence[int] | None, plan: LayerPlan) -> list[int]:
    """The routing group of every new expert: its source expert's (a source that routes without
    groups has one group per expert), so all copies of one original expert share a group, also
    after a second expansion."""
    before = list(groups_E) if groups_E is not None else list(range(plan.num_source))
    return [before[source] for source in plan.sources]


def redrawn_units(hidden: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Which of an expert's `hidden` units a re-initialisation of `fraction` redraws (sorted ids)."""
    count = round(fraction * hidden)
    return torch.randperm(hidden, generator=generator)[:count].sort().values


def redraw(tensor: torch.Tensor, units: torch.Tensor, dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """`tensor` with the slices `units` along `dim` drawn anew from N(0, std^2) (zeros for std 0:
    the Adam moments of the redrawn weights)."""
    out = tensor.clone()
    shape = list(tensor.shape)
    shape[dim] = len(units)
    fresh = torch.randn(shape, generator=generator, dtype=torch.float64) * std if std > 0 else torch.zeros(shape)
    return out.index_copy_(dim, units, fresh.to(tensor.dtype))


def route_bias_scale(plan: LayerPlan, score_func: str | None) -> float:
    """What a router's selection bias is multiplied by: softmax scores shrink as the layer grows
    (softmax_bias_scale), sigmoid scores (and a router of unknown kind) keep their scale."""
    return softmax_bias_scale(plan) if score_func == "softmax" else 1.0


NOISE_ON_BIAS = "routing bias"


@dataclass(frozen=True)
class LayerExpansion:
    """Everything decided for one MoE layer before a byte is written."""

    plan: LayerPlan
    bias_scale: float = 1.0               # route_bias_scale
    noise_on: str = NOISE_ON_BIAS         # where the router noise goes: the bias, else the router rows
    split: SplitDirections | None = None  # with split copies: the directions the copies move along

    def to_dict(self) -> dict:
        record = {**self.plan.to_dict(), "router_noise_on": self.noise_on, "route_bias_scale": self.bias_scale}
        if self.split is not None:
            record.update(split_tokens=self.split.tokens_E.tolist(), split_spread=self.split.spread_E.tolist())
        return record


def copy_moment(tensor: torch.Tensor | None, plan: LayerPlan, slot: int, moment: int, mode: str) -> torch.Tensor | None:
    """New expert `slot`'s Adam moment (1: exp_avg, 2: exp_avg_sq) from its source expert's, as
    `mode` says (moment_factor), None for "fresh"; the tensor itself is handed on where it keeps
    its value."""
    if mode == "fresh":
        return None
    factor = moment_factor(plan, slot, moment, mode)
    return tensor if tensor is None or factor == 1.0 else tensor * factor


def expand_router(rows_ED: torch.Tensor, bias_E: torch.Tensor | None, layer: LayerExpansion, noise_std: float,
                  generator: torch.Generator, split_scale: float = 0.0,
                  relative: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's router for the new experts: (rows [N, D], routing bias [N] or None).

    Rows follow the plan; with split directions the copies' rows move apart (split_router_rows).
    The bias is scaled by layer.bias_scale and, where the noise goes on it, noised by
    expand_router_bias. Otherwise (DeepSpeed's stock gate has no bias; a bias that is not trained
    would keep the noise for good) the noise goes on the replicas' rows, which breaks the ties token
    by token rather than expert by expert; relative noise is then relative to the spread of the
    replicas' row entries. The rows' Adam moments follow expand_rows.
    """
    plan = layer.plan
    rows_ND = expand_rows(rows_ED, plan)
    if layer.split is not None:
        rows_ND = split_router_rows(rows_ND, plan, layer.split.directions_ED, split_offsets(layer.split, split_scale))
    if bias_E is not None and layer.noise_on == NOISE_ON_BIAS:
        return rows_ND, expand_router_bias(bias_E, plan, noise_std, generator, layer.bias_scale, relative)
    if noise_std > 0:
        rows_ND = replica_noise(rows_ND.double(), plan, noise_std, generator, relative).to(rows_ND.dtype)
    bias_N = None if bias_E is None else (expand_rows(bias_E.float(), plan) * layer.bias_scale).to(bias_E.dtype)
    return rows_ND, bias_N
