"""The warm-start jump of an expansion: validation loss of the source and the expanded model.

Both models are measured on the same batches: the first `samples` sequences of the `val` split of
the data the source was trained on (trained.RunData), each model rebuilt in one CPU process in
eval mode (trained.load_model, whatever layout wrote it) and scored by trained.validation_loss,
the loss train.py reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..trained import RunData, checkpoint_loss


@dataclass(frozen=True)
class WarmStart:
    source_loss: float
    expanded_loss: float
    samples: int

    @property
    def jump(self) -> float:
        return self.expanded_loss - self.source_loss

    def describe(self) -> str:
        return (f"validation loss {self.source_loss:.3f} -> {self.expanded_loss:.3f} ({self.jump:+.3f}) "
                f"on {self.samples} sequences")

    def to_dict(self) -> dict:
        return {"source_loss": self.source_loss, "expanded_loss": self.expanded_loss,
                "jump": self.jump, "samples": self.samples, "split": "val"}


def warm_start(source: RunData, expanded_path, samples: int = 64) -> WarmStart:
    """Validation loss of the source and of the expanded checkpoint on the same sequences."""
    if samples < 1:
        raise UserError(f"the warm-start check needs at least one sequence, got {samples}")
    data = source.split("val")
    count = min(samples, data.num_samples)
    source_loss = checkpoint_loss(source.ref.path, data, count)  # one model in memory at a time
    expanded_loss = checkpoint_loss(expanded_path, data, count)
    return WarmStart(source_loss, expanded_loss, count)
