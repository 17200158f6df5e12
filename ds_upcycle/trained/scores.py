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
  batches (gradients.py), in one CPU process (`ds-upcycle expand --calibration-data`) or on the
  training engine (`train.py --score-experts`), which writes every rule's scores to a file
  (`ExpertScores`) that `expand --scores` reads.
For fisher the score is sum g^2 / (g2 + eps) (with Adam state, m^2 / (v + eps)): how consistent an
expert's gradient is relative to its curvature, rather than how large.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..atomic import write_json_atomic
from ..choices import SELECTION_RULES
from ..errors import UserError

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


GRADIENT_RULES = tuple(rule for rule in SELECTION_RULES if rule != "uniform")  # what a scores file holds
SCORES_FORMAT = "ds-upcycle expert scores"
SCORES_VERSION = 1


def scored_checkpoint(tag: str, global_step: int) -> dict:
    """What a scores file records of the checkpoint it scored."""
    return {"tag": tag, "global_step": int(global_step)}


@dataclass(frozen=True)
class ExpertScores:
    """Every rule's score of every expert of a checkpoint, and how they were measured.

    `layers` maps an MoE module prefix to {rule: [score of expert 0, 1, ...]} (experts by global
    id). `checkpoint` names what was scored (tag, global_step): a scores file is only valid for the
    weights it was measured on. `info` says on which data, how many batches, by what.
    """

    layers: dict[str, dict[str, list[float]]]
    checkpoint: dict
    info: dict

    @classmethod
    def from_stats(cls, stats: Mapping[str, Mapping[int, GradientStats]], checkpoint: dict,
                   info: dict) -> "ExpertScores":
        """Scores by every rule from per-expert statistics ({prefix: {global expert id: stats}})."""
        layers = {}
        for prefix, experts in stats.items():
            if sorted(experts) != list(range(len(experts))):
                raise ValueError(f"{prefix}: statistics for experts {sorted(experts)}, not 0..{len(experts) - 1}")
            layers[prefix] = {rule: [expert_score(rule, experts[e]) for e in range(len(experts))]
                              for rule in GRADIENT_RULES}
        return cls(layers, dict(checkpoint), dict(info))

    def layer(self, prefix: str, num_experts: int, rule: str) -> list[float]:
        """One layer's scores by `rule`, checked against the layer's expert count."""
        if prefix not in self.layers:
            raise UserError(f"the scores have no MoE layer {prefix} (they have {', '.join(self.layers) or 'none'})")
        scores = self.layers[prefix].get(rule)
        if scores is None:
            raise UserError(f"the scores have no rule {rule!r} (they have {', '.join(self.layers[prefix])})")
        if len(scores) != num_experts:
            raise UserError(f"the scores have {len(scores)} experts in {prefix}, the checkpoint {num_experts}")
        return list(scores)

    def check_scored(self, tag: str, global_step: int, path: str | os.PathLike) -> None:
        """Refuse scores measured on other weights than those of checkpoint `tag` at `global_step`."""
        step = self.checkpoint.get("global_step")
        if step != global_step:
            raise UserError(f"the scores were measured on {self.checkpoint.get('tag')} (step {step}), but {path} "
                            f"is at step {global_step}: score this checkpoint again")

    def to_dict(self) -> dict:
        return {"format": SCORES_FORMAT, "version": SCORES_VERSION, "checkpoint": self.checkpoint,
                "info": self.info, "layers": self.layers}

    def write(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ExpertScores":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"scores file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not a scores file (not JSON: {err})") from None
        if not isinstance(data, dict) or data.get("format") != SCORES_FORMAT:
            raise UserError(f"{path} is not a scores file (written by train.py --score-experts)")
        if data.get("version") != SCORES_VERSION:
            raise UserError(f"{path} is a version {data.get('version')} scores file; this ds-upcycle reads "
                            f"version {SCORES_VERSION}")
        layers = data.get("layers")
        if not isinstance(layers, dict) or not all(
                isinstance(rules, dict) and all(isinstance(v, list) for v in rules.values()) for rules in layers.values()):
            raise UserError(f"{path}: 'layers' must map each MoE layer to lists of scores by rule")
        return cls({p: {r: [float(x) for x in v] for r, v in rules.items()} for p, rules in layers.items()},
                   dict(data.get("checkpoint") or {}), dict(data.get("info") or {}))
