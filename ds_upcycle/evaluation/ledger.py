"""The compute ledger: what the upcycled path cost against training the big model from the start.

With T total steps, the transition at step T0 and per-step times t_E < t_mE:
    fixed-size cost   T * t_mE
    upcycled cost     T0 * t_E + (T - T0) * t_mE
    saving            T0 * (t_mE - t_E) / (T * t_mE)
and when the E-expert checkpoint already exists only the CPT, (T - T0) * t_mE, is paid.
Step times are medians over the training runs' metrics.jsonl (robust to the first, slow steps).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..checkpoint import read_metrics


@dataclass(frozen=True)
class ComputeLedger:
    step_time_e: float
    step_time_me: float
    total_steps: int
    transition_step: int

    def __post_init__(self) -> None:
        if not 0 < self.transition_step < self.total_steps:
            raise UserError(f"transition step {self.transition_step} must lie inside the {self.total_steps} steps")

    @property
    def fixed_cost(self) -> float:
        return self.total_steps * self.step_time_me

    @property
    def upcycled_cost(self) -> float:
        return self.transition_step * self.step_time_e + (self.total_steps - self.transition_step) * self.step_time_me

    @property
    def saving(self) -> float:
        return 1.0 - self.upcycled_cost / self.fixed_cost

    @property
    def cpt_cost(self) -> float:
        return (self.total_steps - self.transition_step) * self.step_time_me

    @property
    def saving_with_source(self) -> float:
        return 1.0 - self.cpt_cost / self.fixed_cost

    def to_dict(self) -> dict:
        return {**asdict(self), "cpt_fraction": 1 - self.transition_step / self.total_steps,
                "step_time_ratio": self.step_time_me / self.step_time_e, "fixed_cost_s": self.fixed_cost,
                "upcycled_cost_s": self.upcycled_cost, "saving": self.saving, "cpt_cost_s": self.cpt_cost,
                "saving_with_source": self.saving_with_source}

    def to_markdown(self) -> str:
        return "\n".join([
            f"Compute ledger: T = {self.total_steps} steps, transition at T0 = {self.transition_step} "
            f"({100 * (1 - self.transition_step / self.total_steps):.0f}% CPT), "
            f"t_E = {self.step_time_e * 1000:.1f} ms, t_mE = {self.step_time_me * 1000:.1f} ms "
            f"(ratio {self.step_time_me / self.step_time_e:.3f})",
            "",
            "| path | cost (s) | saving |",
            "| --- | ---: | ---: |",
            f"| fixed mE from scratch | {self.fixed_cost:.1f} | - |",
            f"| upcycled (E pre-training + CPT) | {self.upcycled_cost:.1f} | {100 * self.saving:.1f}% |",
            f"| upcycled, E checkpoint already exists (CPT only) | {self.cpt_cost:.1f} | "
            f"{100 * self.saving_with_source:.1f}% |",
        ]) + "\n"


def _metrics(run: str | Path) -> list[dict]:
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no training metrics at {path}")
    records = read_metrics(path)
    if not records:
        raise UserError(f"{path} holds no training records")
    return records


def median_step_time(records: list[dict]) -> float:
    return statistics.median(r["step_time"] for r in records)


def ledger_from_runs(fixed_e: str | Path, upcycled_cpt: str | Path, fixed_me: str | Path) -> ComputeLedger:
    """From the save dirs (or metrics.jsonl files) of the Fixed-E run, the upcycled run's CPT stage
    (its records start right after the transition) and the Fixed-mE run."""
    cpt = _metrics(upcycled_cpt)
    return ComputeLedger(step_time_e=median_step_time(_metrics(fixed_e)),
                         step_time_me=median_step_time(_metrics(fixed_me)),
                         total_steps=cpt[-1]["step"], transition_step=cpt[0]["step"] - 1)
