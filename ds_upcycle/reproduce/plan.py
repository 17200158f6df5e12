"""The experiment as a list of stages: which runs, in which order, from which checkpoints.

Arms (directories under the output directory):
    fixed-e                 E experts, T steps
    fixed-me                m*E experts, T steps
    source-cptNN            E experts, T0 steps, ending with its own anneal (the transition point)
    expanded-cptNN-RULE     source-cptNN expanded to m*E experts with selection RULE
    upcycled-cptNN-RULE     continued pre-training of the expansion for T - T0 steps on the cpt split
    continued-e-cptNN       control: the same CPT stage from source-cptNN without expansion

A source run and Fixed-E are the same run until the source's anneal begins (same init, data order
and warmup; the LR is flat in between), so a source run starts from a Fixed-E checkpoint taken
before that point and only trains the rest, with its own schedule end. Fixed-E saves every
`branch_interval` steps to provide those checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ReproduceConfig

FIXED_E, FIXED_ME = "fixed-e", "fixed-me"
SELECTION_RULES_COMPARED = ("uniform", "grad_sq")


@dataclass(frozen=True)
class TrainStage:
    """One train.py run saving into the arm directory `name`.

    experts: experts per MoE layer of a run from scratch; None when it starts from `load`.
    load: arm whose checkpoint a new stage starts from (--load ... --fresh-schedule).
    branch: (arm, step): continue a copy of that arm's checkpoint at `step` (same stage, new end).
    """

    name: str
    steps: int
    experts: int | None = None
    split: str = "pretrain"
    load: str | None = None
    branch: tuple[str, int] | None = None
    save_interval: int = 0


@dataclass(frozen=True)
class ExpandStage:
    name: str
    source: str
    select: str


@dataclass(frozen=True)
class UpcycledArm:
    cpt_fraction: float
    transition: int
    select: str
    source: str
    expanded: str
    cpt: str

    @property
    def label(self) -> str:
        return f"upcycled {round(100 * self.cpt_fraction)}% CPT {self.select}"


@dataclass(frozen=True)
class Plan:
    stages: tuple[TrainStage | ExpandStage, ...]
    upcycled: tuple[UpcycledArm, ...]
    main: UpcycledArm
    branch_steps: tuple[int, ...]
    control: str | None = None

    @property
    def evaluated(self) -> tuple[str, ...]:
        """Arms whose final checkpoints are evaluated, Fixed-E first."""
        return (FIXED_E, self.main.cpt, FIXED_ME, *(a.cpt for a in self.upcycled if a != self.main),
                *((self.control,) if self.control else ()))


def branch_interval(cfg: ReproduceConfig) -> int:
    return max(1, cfg.total_steps // 20)


def branch_step(cfg: ReproduceConfig, transition: int) -> int | None:
    """Last Fixed-E checkpoint a source run of `transition` steps can continue from, if any.

    The continued run's first step still uses the learning rate computed for Fixed-E's schedule
    (train.py applies the new stage end from the next step on), so the branch must lie before the
    source's anneal starts: there both schedules give the same LR.
    """
    interval = branch_interval(cfg)
    latest = transition - cfg.decay_steps(transition) - 1
    step = latest // interval * interval
    return step if step >= 1 else None


def _tag(fraction: float) -> str:
    return f"cpt{round(100 * fraction)}"


def make_plan(cfg: ReproduceConfig) -> Plan:
    arms: list[UpcycledArm] = []
    for fraction in cfg.cpt_fractions:
        rules = (cfg.select,) if fraction == cfg.cpt_fraction else ()
        if fraction == cfg.selection_cpt_fraction:
            rules = tuple(dict.fromkeys((*rules, *SELECTION_RULES_COMPARED)))
        source = f"source-{_tag(fraction)}"
        for rule in rules:
            arms.append(UpcycledArm(fraction, cfg.transition_step(fraction), rule, source,
                                    f"expanded-{_tag(fraction)}-{rule}", f"upcycled-{_tag(fraction)}-{rule}"))
    main = next(a for a in arms if a.cpt_fraction == cfg.cpt_fraction and a.select == cfg.select)

    sources = {a.source: a.transition for a in arms}
    branches = {name: branch_step(cfg, t0) for name, t0 in sources.items()}
    steps = tuple(sorted({b for b in branches.values() if b is not None}))
    stages: list[TrainStage | ExpandStage] = [
        TrainStage(FIXED_E, cfg.total_steps, cfg.num_experts, save_interval=branch_interval(cfg) if steps else 0),
        TrainStage(FIXED_ME, cfg.total_steps, cfg.big_experts),
    ]
    for name, t0 in sources.items():
        b = branches[name]
        stages.append(TrainStage(name, t0, cfg.num_experts, branch=(FIXED_E, b) if b else None))
    for arm in arms:
        stages.append(ExpandStage(arm.expanded, arm.source, arm.select))
        stages.append(TrainStage(arm.cpt, cfg.total_steps - arm.transition, split="cpt", load=arm.expanded))
    control = f"continued-e-{_tag(main.cpt_fraction)}" if cfg.control else None
    if control:
        stages.append(TrainStage(control, cfg.total_steps - main.transition, split="cpt", load=main.source))
    return Plan(tuple(stages), tuple(arms), main, steps, control)
