"""Auxiliary-loss-free load balancing: the per-step routing-bias update and load statistics."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .router import LossFreeRouter


def bias_step(bias_E: torch.Tensor, load_E: torch.Tensor, step_size: float) -> torch.Tensor:
    """b_i + u * sign(mean_load - load_i): under-loaded experts become more attractive."""
    return bias_E + step_size * torch.sign(load_E.mean() - load_E)


def load_stats(load_E: torch.Tensor) -> dict:
    """Share of routed tokens of the least and most loaded expert, the coefficient of variation, and
    every expert's share (by global id), so that replicas can be followed apart after an expansion."""
    total = load_E.sum().clamp_min(1.0)
    share_E = load_E / total
    mean = load_E.mean()
    cv = (load_E.std(unbiased=False) / mean).item() if mean > 0 else 0.0
    return {"min_share": share_E.min().item(), "max_share": share_E.max().item(), "cv": cv,
            "shares": [round(share, 6) for share in share_E.tolist()]}


def balance_biases(biases: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], step_size: float,
                   reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
    """Update every layer's selection bias (in place) from its token counts summed over all
    data-parallel ranks, the load of the whole global batch, then clear the counts.

    `reduce` sums a tensor over the ranks (one collective for all layers). Returns per-layer load
    statistics of the batch (see load_stats).
    """
    if not biases:
        return []
    # Layers may differ in expert count (an expansion of some layers only): one flat tensor, split after.
    loads = reduce(torch.cat(list(counts))).split([c.numel() for c in counts])
    stats = []
    with torch.no_grad():
        for bias_E, count_E, load_E in zip(biases, counts, loads):
            if step_size > 0:
                bias_E.copy_(bias_step(bias_E, load_E, step_size))
            count_E.zero_()
            stats.append(load_stats(load_E))
    return stats


def balance_routers(routers: Sequence[LossFreeRouter], step_size: float,
                    reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
    """balance_biases for ds-upcycle's routers (route_bias from route_load)."""
    return balance_biases([r.route_bias for r in routers], [r.route_load for r in routers], step_size, reduce)
