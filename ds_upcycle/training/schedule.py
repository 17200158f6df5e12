"""Warmup-stable-decay (WSD) learning-rate schedule, one per training stage.

lr(t) for step t of a stage of `total` steps: linear warmup over `warmup` steps, constant at the
peak, then a linear decay to min_ratio * peak over the last `decay_fraction` of the stage. A stage
starts at an optimizer step (`stage_start`); continued pre-training from an expanded checkpoint
starts a new stage while keeping the optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WSDSchedule:
    """LR scheduler for DeepSpeed: step() after every optimizer step; state saved in checkpoints."""

    optimizer: object
    total: int
    warmup: int = 0
    decay_fraction: float = 0.1
    min_ratio: float = 0.0
    stage_start: int = 0
    step_count: int = 0

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError("schedule needs at least one step")
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._apply()

    def factor(self, step_in_stage: int) -> float:
        decay_steps = max(1, round(self.decay_fraction * self.total)) if self.decay_fraction > 0 else 0
        if self.warmup and step_in_stage < self.warmup:
            return (step_in_stage + 1) / self.warmup
        decay_start = self.total - decay_steps
        if decay_steps and step_in_stage >= decay_start:
            done = min(1.0, (step_in_stage - decay_start + 1) / decay_steps)
            return 1.0 - (1.0 - self.min_ratio) * done
        return 1.0

    def _apply(self) -> None:
        scale = self.factor(self.step_count - self.stage_start)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * scale

    def step(self, **_) -> None:
        self.step_count += 1
        self._apply()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def settings(self) -> dict:
        """The stage's settings, as `start_stage` and `update` take them."""
        return {"total": self.total, "warmup": self.warmup, "decay_fraction": self.decay_fraction,
                "min_ratio": self.min_ratio, "peak_lrs": list(self.peak_lrs)}

    def update(self, total: int, warmup: int, decay_fraction: float, min_ratio: float,
               peak_lrs: list[float]) -> None:
        """Change the current stage's settings; the stage keeps its start (a resumed run)."""
        self.total, self.warmup, self.peak_lrs = total, warmup, list(peak_lrs)
        self.decay_fraction, self.min_ratio = decay_fraction, min_ratio
        self._apply()

    def start_stage(self, total: int, warmup: int, decay_fraction: float, min_ratio: float,
                    peak_lrs: list[float]) -> None:
        """Begin a new stage at the current step (e.g. CPT after expansion), every setting given anew."""
        self.stage_start = self.step_count
        self.update(total, warmup, decay_fraction, min_ratio, peak_lrs)

    def state_dict(self) -> dict:
        state = {key: getattr(self, key) for key in _STATE}
        state["peak_lrs"] = list(self.peak_lrs)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in _STATE:
            setattr(self, key, state[key])
        self.peak_lrs = list(state["peak_lrs"])
        self._apply()


_STATE = ("total", "warmup", "decay_fraction", "min_ratio", "stage_start", "step_count")
