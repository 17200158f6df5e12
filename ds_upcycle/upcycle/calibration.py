"""Utility scores from exact gradients on calibration batches, instead of the Adam state.

For each batch b of a fixed sequence of batches, the gradient G_b of the batch's mean next-token
cross-entropy (the training loss; the auxiliary balance loss only reaches the router, never an
expert) is taken with respect to every expert parameter. Per parameter the statistics are

    g  = mean_b G_b          the mean gradient       (what Adam's exp_avg estimates)
    g2 = mean_b G_b^2        the mean squared gradient (what exp_avg_sq estimates)

and, with the fp32 weight, they form one `GradientStats` per expert, scored by the same rules as
the Adam state (scores.py). An expert that receives no token of a batch has a zero gradient for it.

The model is the source rebuilt in one CPU process in fp32 from the checkpoint's fp32 master
weights (trained.load_master_model), in eval mode (the router then keeps no load counters, and
nothing is random): the same checkpoint, data and settings give bit-identical scores on the same
machine and thread count.

`expert_gradient_stats` is the computation (model and batches in, statistics out); the functions
below it find the data and the model for a checkpoint.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointReader
from ..data.sources import resolve_source
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..moe.names import split_expert_param
from ..trained import RunData, load_master_model
from .scores import GradientStats, expert_score

SOURCE_DATA = "source"  # --calibration-data source: the cpt split of the source's own training data
SOURCE_SPLIT = "cpt"

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, T], targets [B, T]) token ids


def expert_gradient_stats(model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, list[GradientStats]]:
    """Mean gradient and mean squared gradient over `batches` of every expert, by MoE module prefix.

    Returns {prefix: [GradientStats of expert 0, 1, ...]} with experts by global id, keys inside
    an expert as in the checkpoint (e.g. "w_up.weight"). The model must hold every expert (built
    with ep_size 1); it is left as it was found.
    """
    experts: dict[str, dict[int, dict[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        parts = split_expert_param(name)
        if parts is not None:
            prefix, expert, suffix = parts
            experts.setdefault(prefix, {}).setdefault(expert, {})[suffix] = param
    if not experts:
        raise UserError("the model has no MoE experts to calibrate")
    names = [(prefix, expert, suffix) for prefix in experts for expert in sorted(experts[prefix])
             for suffix in experts[prefix][expert]]
    params = [experts[p][e][s] for p, e, s in names]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sums_sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    expert_ids = {id(p) for p in params}
    model.eval()
    count = 0
    try:
        # Only expert weights need gradients; the rest still passes gradients through activations.
        for p in model.parameters():
            p.requires_grad_(id(p) in expert_ids)
        for inputs_BT, targets_BT in batches:
            with torch.enable_grad():
                logits_BTV, _ = model(inputs_BT)
                loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, total_sq, grad in zip(sums, sums_sq, grads):
                if grad is not None:  # None: the expert got no token of this batch
                    grad = grad.float()
                    total += grad
                    total_sq += grad * grad
            count += 1
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])
        model.train(was_training)
    if count == 0:
        raise UserError("no calibration batches")

    stats: dict[str, list[GradientStats]] = {}
    by_expert: dict[tuple[str, int], GradientStats] = {}
    for (prefix, expert, suffix), param, total, total_sq in zip(names, params, sums, sums_sq):
        entry = by_expert.get((prefix, expert))
        if entry is None:
            entry = by_expert[(prefix, expert)] = GradientStats({}, {}, {})
            stats.setdefault(prefix, []).append(entry)
        entry.weight[suffix] = param.detach().float().clone()
        entry.grad[suffix] = total / count
        entry.grad_sq[suffix] = total_sq / count
    return stats


def scores_by_layer(stats: dict[str, list[GradientStats]], rule: str) -> dict[str, list[float]]:
    return {prefix: [expert_score(rule, s) for s in experts] for prefix, experts in stats.items()}


@dataclass(frozen=True)
class CalibrationData:
    """The token windows calibration reads, in order, and where they came from."""

    windows: np.ndarray          # [num_windows, seq_len + 1] token ids
    description: str

    def batches(self, batch_size: int) -> list[Batch]:
        rows = torch.from_numpy(self.windows.astype(np.int64))
        return [(chunk[:, :-1], chunk[:, 1:]) for chunk in rows.split(batch_size)]


def check_calibration_source(spec: str) -> None:
    """Fail early (before anything is read in bulk or written) if the calibration data cannot be had."""
    if spec != SOURCE_DATA:
        resolve_source(spec)  # a missing path is refused here; a hub name is only tried when read


def calibration_data(run: RunData, spec: str, num_windows: int) -> CalibrationData:
    """The first `num_windows` windows of seq_len + 1 tokens of the calibration data, in order.

    `spec` "source": the cpt split of the source's own training data (prepared and cached as
    train.py does). Otherwise a data source as train.py takes it (synthetic[:...], a .txt/.jsonl/
    .parquet file or directory, a hub dataset): every document in the source's order, each
    followed by EOS, tokenized with the checkpoint's tokenizer, concatenated; no split is taken
    out, and reading stops once enough tokens are in hand.
    """
    seq_len, needed = run.seq_len, num_windows * run.seq_len + 1
    if spec == SOURCE_DATA:
        tokens = np.asarray(run.tokens(SOURCE_SPLIT)[:needed])
        description = f"{SOURCE_SPLIT} split of the source's training data ({run.config.source})"
    else:
        text = resolve_source(spec, run.text_field)
        tokenizer = load_tokenizer(run.tokenizer)
        pieces, have = [], 0
        for doc in text.documents():
            if not doc.strip():
                continue
            ids = tokenizer.encode(doc) + [tokenizer.eos_id]
            pieces.append(np.asarray(ids, dtype=np.int64))
            have += len(ids)
            if have >= needed:
                break
        tokens = np.concatenate(pieces)[:needed] if pieces else np.zeros(0, dtype=np.int64)
        description = text.description
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise UserError(f"calibration data {spec!r} has {len(tokens)} tokens, fewer than one sequence of "
                        f"{seq_len + 1}")
    windows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]).astype(np.int64)
    if int(windows.max()) >= run.vocab_size:
        raise UserError(f"calibration tokens exceed the model's vocabulary of {run.vocab_size}")
    return CalibrationData(windows, description)


@dataclass(frozen=True)
class Calibration:
    """Per-expert gradient statistics of a checkpoint and how they were measured."""

    stats: dict[str, list[GradientStats]]
    info: dict

    def layer_stats(self, prefix: str) -> list[GradientStats]:
        if prefix not in self.stats:
            raise UserError(f"calibration found no experts for MoE layer {prefix}")
        return self.stats[prefix]


def calibrate(source: CheckpointReader, run: RunData, spec: str, num_batches: int, batch_size: int) -> Calibration:
    """Gradient statistics of every expert of a checkpoint over the first batches of `spec`."""
    data = calibration_data(run, spec, num_batches * batch_size)
    batches = data.batches(batch_size)
    model = load_master_model(source)
    try:
        stats = expert_gradient_stats(model, batches)
    finally:
        del model
        gc.collect()
    info = {"from": "calibration data", "data": spec, "description": data.description,
            "batches": len(batches), "batch_size": batch_size, "sequences": int(data.windows.shape[0]),
            "seq_len": int(data.windows.shape[1] - 1)}
    return Calibration(stats, info)
