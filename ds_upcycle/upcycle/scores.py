"""Per-expert utility scores: which experts deserve more copies.

Each rule maps one expert's state (its fp32 weights, and a gradient estimate) to one number:

    grad_sq      sum g^2                  squared gradient norm (the recommended default)
    saliency     |sum w * g|              weight-gradient saliency, first-order loss change
    weight_norm  sqrt(sum w^2)
    fisher       sum g^2 / (F + eps)      squared gradient normalised by the diagonal Fisher F

Gradient estimates come from either source:
- the checkpoint's Adam state, no data needed: exp_avg is a running mean of g and exp_avg_sq a
  running mean of g^2 (the diagonal empirical Fisher); `GradientStats.from_adam`;
- exact gradients over calibration batches: the mean gradient and the mean squared gradient over
  batches; calibration.py.
For fisher the score is sum g^2 / (g2 + eps) (with Adam state, m^2 / (v + eps)): how consistent an
expert's gradient is relative to its curvature, rather than how large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

SELECTION_RULES = ("uniform", "grad_sq", "saliency", "weight_norm", "fisher")
GRADIENT_FREE_RULES = ("uniform", "weight_norm")  # need no gradient estimate
FISHER_EPS = 1e-12


@dataclass
class GradientStats:
    """Per-parameter weight w, mean gradient g and mean squared gradient g2 of one expert."""

    weight: dict[str, torch.Tensor]
    grad: dict[str, torch.Tensor]
    grad_sq: dict[str, torch.Tensor]

    @classmethod
    def from_adam(cls, weight: Mapping[str, torch.Tensor], exp_avg: Mapping[str, torch.Tensor],
                  exp_avg_sq: Mapping[str, torch.Tensor]) -> "GradientStats":
        return cls(dict(weight), dict(exp_avg), dict(exp_avg_sq))


def _sum(stats: GradientStats, fn: Callable[[str], torch.Tensor]) -> float:
    # Detached: checkpoint readers may hand over Parameters, and a score is never differentiated.
    return float(sum(fn(name).detach().double().sum() for name in sorted(stats.weight)))


def expert_score(rule: str, stats: GradientStats) -> float:
    w, g, g2 = stats.weight, stats.grad, stats.grad_sq
    if rule == "grad_sq":
        return _sum(stats, lambda n: g2[n])
    if rule == "saliency":
        return abs(_sum(stats, lambda n: w[n].double() * g[n].double()))
    if rule == "weight_norm":
        return _sum(stats, lambda n: w[n].double().square()) ** 0.5
    if rule == "fisher":
        return _sum(stats, lambda n: g[n].double().square() / (g2[n].double() + FISHER_EPS))
    raise ValueError(f"unknown selection rule {rule!r}; choose from {', '.join(SELECTION_RULES)}")
