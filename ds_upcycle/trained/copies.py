"""Have the copies of an expansion broken symmetry? Distances between experts and shared routing.

Right after `ds-upcycle expand` the copies of one source expert are equal (siblings); continued
pre-training is meant to move them apart until they are as different as experts of different
sources. Two measures per MoE layer, recorded at every evaluation of a run whose record names its
experts' sources (RunRecord.copy_of):

- relative weight distance d(i, j) = ||w_i - w_j|| / ((||w_i|| + ||w_j||) / 2), with w an expert's
  weights (gate, up and down projections) as one vector: 0 for equal experts, about sqrt(2) for
  independent ones of equal norm. Reported as the mean over sibling pairs and over pairs of experts
  of different sources;
- co-selection: the share of tokens whose top-K choices hold two siblings. Copies that still
  compute the same function waste the second choice on a duplicate.

Shape suffixes: E experts, P an expert's parameters, S tokens, K choices per token.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import combinations
from typing import Iterator, Sequence

import torch

from .. import comm
from ..errors import UserError
from ..model import Transformer
from ..moe.live import live_moe_layers
from .data import RunData
from .loss import BATCH_SIZE, validation_loss
from .model import load_model


def pair_distances(vectors_EP: torch.Tensor, copy_of: Sequence[int]) -> dict[str, float | None]:
    """Mean relative distance between siblings and between experts of different sources (None
    where a layer has no such pair)."""
    w_EP = vectors_EP.double()
    norms_E = w_EP.norm(dim=1)
    sibling, cross = [], []
    for i, j in combinations(range(len(copy_of)), 2):
        d = ((w_EP[i] - w_EP[j]).norm() / ((norms_E[i] + norms_E[j]) / 2).clamp_min(1e-30)).item()
        (sibling if copy_of[i] == copy_of[j] else cross).append(d)
    return {"sibling_distance": sum(sibling) / len(sibling) if sibling else None,
            "cross_distance": sum(cross) / len(cross) if cross else None}


def co_selected(experts_SK: torch.Tensor, copy_of_E: torch.Tensor) -> int:
    """Tokens whose K chosen experts include two copies of one source expert."""
    if experts_SK.shape[1] < 2:
        return 0
    sources_SK = copy_of_E[experts_SK.long()].sort(dim=1).values
    return int((sources_SK[:, 1:] == sources_SK[:, :-1]).any(dim=1).sum())


def expert_vectors(model: Transformer, layer_position: int) -> torch.Tensor:
    """[E, P]: every expert of one MoE layer as one flat fp32 vector, gathered over expert parallelism."""
    layer = live_moe_layers(model)[layer_position]
    local_EP = torch.stack([torch.cat([w.detach().float().flatten() for w in weights])
                            for weights in layer.expert_weights()])
    ids_E = torch.tensor(layer.expert_ids, device=local_EP.device)
    gathered_EP = comm.gather_over_group(local_EP, layer.ep_group)
    gathered_ids = comm.gather_over_group(ids_E, layer.ep_group)
    return gathered_EP[gathered_ids.argsort()]


class CoSelection:
    """Counts co-selected tokens per MoE layer while installed on its routing (see `counting`)."""

    def __init__(self, copy_of: Sequence[Sequence[int]]) -> None:
        self.copy_of = [torch.tensor(c, dtype=torch.long) for c in copy_of]
        self.counts = torch.zeros(len(copy_of), 2, dtype=torch.float64)  # [layer, (co-selected, tokens)]

    def hook(self, position: int):
        def count(experts_SK: torch.Tensor) -> None:
            copy_of_E = self.copy_of[position].to(experts_SK.device)
            self.counts[position, 0] += co_selected(experts_SK, copy_of_E)
            self.counts[position, 1] += experts_SK.shape[0]
        return count

    def shares(self) -> list[float | None]:
        """Share per layer over every rank's tokens (each rank routes its own tokens once)."""
        totals = comm.sum_over_world(self.counts.clone())
        return [c / n if n > 0 else None for c, n in totals.tolist()]


@contextmanager
def counting(model: Transformer, copy_of: Sequence[Sequence[int]]) -> Iterator[CoSelection]:
    counter = CoSelection(copy_of)
    handles = [layer.on_routes(counter.hook(i)) for i, layer in enumerate(live_moe_layers(model))]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def copy_diagnostics(model: Transformer, copy_of: Sequence[Sequence[int]], counter: CoSelection) -> list[dict]:
    """One record per MoE layer: sibling and cross distances now, co-selection over the counted tokens."""
    shares = counter.shares()
    return [{"layer": layer_id, **pair_distances(expert_vectors(model, i), copy_of[i]), "co_selected": shares[i]}
            for i, layer_id in enumerate(model.cfg.moe_layer_ids)]


def checkpoint_copy_diagnostics(path, copy_of: Sequence[Sequence[int]] | None = None, samples: int = 128,
                                data_cache: str | None = None) -> list[dict]:
    """The same records for a checkpoint on disk, in one process: distances of its weights, co-selection
    over the first `samples` sequences of its validation split. `copy_of` defaults to its record's."""
    loaded = load_model(path)
    lineage = copy_of if copy_of is not None else loaded.record.copy_of
    if lineage is None:
        raise UserError(f"{loaded.ref.path} records no expansion (copy_of); give the sources of its experts")
    with counting(loaded.model, lineage) as counter:
        validation_loss(loaded.model, RunData(loaded.ref, data_cache).split("val"), samples, BATCH_SIZE)
    return copy_diagnostics(loaded.model, lineage, counter)
