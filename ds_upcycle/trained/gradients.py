"""Mean gradient and mean squared gradient of every expert over a fixed sequence of batches.

For each batch b the gradient G_b of the batch's mean next-token cross-entropy (the training loss;
the auxiliary balance loss only reaches the router, never an expert) is taken with respect to every
expert parameter. Per parameter the statistics are

    g  = mean_b G_b          the mean gradient         (what Adam's exp_avg estimates)
    g2 = mean_b G_b^2        the mean squared gradient (what exp_avg_sq estimates)

and, with the weight, they form one `GradientStats` per expert (scored by scores.py). An expert that
receives no token of a batch has a zero gradient for it.

One computation serves one CPU process (the whole batch at once) and a DeepSpeed job (each process
takes its share of every batch in micro-batches; `average` then makes the mean over processes, see
training/scoring.py). The model runs in eval mode: the router keeps no load counters and nothing is
random, so the same weights and batches give the same statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..moe.live import live_moe_layers
from .scores import GradientStats

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, T], targets [B, T]) token ids
ExpertKey = tuple[str, int, str]            # (MoE module prefix, global expert id, weight name)


def expert_parameters(model: torch.nn.Module) -> dict[ExpertKey, tuple[torch.nn.Parameter, int | None]]:
    """The expert weights this process holds, keyed with global expert ids, in module order: each a
    parameter and the expert's slice index in it (None: the parameter is the expert's alone)."""
    return {(layer.path, expert, name): (param, index) for layer in live_moe_layers(model)
            for expert, name, param, index in layer.expert_parameters()}


def expert_gradient_stats(model: torch.nn.Module, batches: Iterable[Sequence[Batch]],
                          average: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          ) -> dict[str, dict[int, GradientStats]]:
    """{prefix: {global expert id: GradientStats}} of the experts this process holds.

    Each item of `batches` is this process's share of one batch, as micro-batches of equal size;
    the process's gradient is the mean over its micro-batches, and `average` (when given) turns it
    into the mean over processes in place, e.g. an all-reduce. Weights are the model's parameters,
    detached (not copied). The model is left as it was found.
    """
    weights = expert_parameters(model)
    if not weights:
        raise UserError("the model has no MoE experts to score")
    params = list({id(param): param for param, _ in weights.values()}.values())  # a stacked one once
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sums_sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    trained_ids = {id(p) for p in params}
    model.eval()
    count = 0
    try:
        # Only expert weights need gradients; the rest still passes gradients through activations.
        for p in model.parameters():
            p.requires_grad_(id(p) in trained_ids)
        for micro_batches in batches:
            grads = _mean_gradient(model, micro_batches, params)
            for total, total_sq, grad in zip(sums, sums_sq, grads):
                if average is not None:
                    average(grad)
                total += grad
                total_sq += grad * grad
            count += 1
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])
        model.train(was_training)
    if count == 0:
        raise UserError("no batches to score on")

    position = {id(param): i for i, param in enumerate(params)}
    for total, total_sq in zip(sums, sums_sq):
        total.div_(count)
        total_sq.div_(count)

    def part(tensor: torch.Tensor, index: int | None) -> torch.Tensor:
        return tensor if index is None else tensor[index]

    stats: dict[str, dict[int, GradientStats]] = {}
    for (prefix, expert, name), (param, index) in weights.items():
        entry = stats.setdefault(prefix, {}).setdefault(expert, GradientStats({}, {}, {}))
        i = position[id(param)]
        entry.weight[name] = part(param.detach(), index)
        entry.grad[name] = part(sums[i], index)
        entry.grad_sq[name] = part(sums_sq[i], index)
    return stats


def _mean_gradient(model: torch.nn.Module, micro_batches: Sequence[Batch], params: list[torch.Tensor]):
    """Mean over micro-batches of the gradient of each one's mean cross-entropy, in fp32."""
    device = params[0].device
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for inputs_BT, targets_BT in micro_batches:
        with torch.enable_grad():
            logits_BTV, _ = model(inputs_BT.to(device))
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.to(device).flatten())
            micro = torch.autograd.grad(loss, params, allow_unused=True)
        for total, grad in zip(grads, micro):
            if grad is not None:  # None: the expert got no token of this micro-batch
                total += grad.float()
    if len(micro_batches) > 1:
        for total in grads:
            total.div_(len(micro_batches))
    return grads
