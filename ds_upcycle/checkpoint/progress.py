"""A progress bar per MoE layer while a checkpoint is written: wraps any CheckpointSource."""

from __future__ import annotations

from tqdm import tqdm

from .state import CheckpointSource, NonExpertState, ParamState


class ProgressSource:
    """The writer's walk over experts, shown as one bar per MoE layer (on stderr, gone when done).

    Large writes (a 7B import, a 64 -> 128 expansion) spend minutes there; the bar is what tells
    the user that the command is working and how far it got."""

    def __init__(self, inner: CheckpointSource) -> None:
        self.inner, self.meta, self.moe_layers = inner, inner.meta, inner.moe_layers
        self._bars: dict[int, tqdm] = {}
        self._seen: dict[int, set[int]] = {}

    def non_expert_state(self) -> NonExpertState:
        return self.inner.non_expert_state()

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        bar = self._bars.get(layer)
        if bar is None:
            bar = self._bars[layer] = tqdm(total=self.moe_layers[layer].num_experts, unit="expert", leave=False,
                                           desc=f"MoE layer {layer + 1} of {len(self.moe_layers)}",
                                           dynamic_ncols=True)
        state = self.inner.expert_state(layer, expert)
        seen = self._seen.setdefault(layer, set())
        if expert not in seen:  # the writer may ask twice for an expert split over two partitions
            seen.add(expert)
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()
        return state
