"""The experiment as a list of stages: which runs, in which order, from which checkpoints.

Arms (directories under the output directory):
    fixed-e                 E experts, T steps
    fixed-me                m*E experts, T steps
    source-cptNN            E experts, T0 steps, ending with its own anneal (the transition point);
                            with transition "stable", a copy of Fixed-E's checkpoint at T0
    expanded-cptNN-RULE     source-cptNN expanded to m*E experts with selection RULE
    upcycled-cptNN-RULE     continued pre-training of the expansion for T - T0 steps on the cpt split
                            (cpt_data "pretrain": on the source's data, continued)
    continued-e-cptNN       control: the same CPT stage from source-cptNN without expansion
    staged-expanded-N       with `growth`: the checkpoint before, grown to N experts
    staged-N                its continued pre-training up to the next growth step (the last: to T)

A source run and Fixed-E are the same run until the source's anneal begins (same init, data order
and warmup; the LR is flat in between), so a source run starts from a Fixed-E checkpoint taken
before that point and only trains the rest, with its own schedule end. Fixed-E saves every
`branch_interval` steps to provide those checkpoints.
"""

from __future__ import annotations

import dataclasses
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
    warmup, decay_fraction: the stage's schedule where it differs from the config's rule.
    """

    name: str
    steps: int
    experts: int | None = None
    split: str = "pretrain"
    load: str | None = None
    branch: tuple[str, int] | None = None
    save_interval: int = 0
    warmup: int | None = None
    decay_fraction: float | None = None
    exit_at: int | None = None          # stop at this global step (a stage of staged growth)
    micro_batch_size: int | None = None  # where it differs from the config's (cpt_batch_split)
    keep_data_position: bool = False    # continue the loaded checkpoint's data (staged growth, cpt_data "pretrain")
    lr_scale: float = 1.0               # of the DeepSpeed config's learning rate (cpt_lr_scale)


@dataclass(frozen=True)
class BranchStage:
    """A copy of an arm's checkpoint at `step`, trained no further (a stable-phase source)."""

    name: str
    branch: tuple[str, int]


@dataclass(frozen=True)
class ExpandStage:
    name: str
    source: str
    select: str
    num_experts: int | None = None      # target experts; None: the config's multiplier


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
class StagedArm:
    """Growth in stages: grown to counts[i] experts at steps[i], from `source` (Fixed-E at steps[0])."""

    num_experts: int
    steps: tuple[int, ...]
    counts: tuple[int, ...]
    source: str

    @property
    def expanded(self) -> tuple[str, ...]:
        return tuple(f"staged-expanded-{n}" for n in self.counts)

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(f"staged-{n}" for n in self.counts)

    @property
    def cpt(self) -> str:
        return self.trained[-1]

    @property
    def label(self) -> str:
        counts = " -> ".join(map(str, (self.num_experts, *self.counts)))
        return f"staged {counts} at steps {', '.join(map(str, self.steps))}"


@dataclass(frozen=True)
class Plan:
    stages: tuple[TrainStage | BranchStage | ExpandStage, ...]
    upcycled: tuple[UpcycledArm, ...]
    main: UpcycledArm
    branch_steps: tuple[int, ...]
    control: str | None = None
    staged: StagedArm | None = None

    @property
    def evaluated(self) -> tuple[str, ...]:
        """Arms whose final checkpoints are evaluated, Fixed-E first."""
        return (FIXED_E, self.main.cpt, FIXED_ME, *(a.cpt for a in self.upcycled if a != self.main),
                *((self.control,) if self.control else ()), *((self.staged.cpt,) if self.staged else ()))


def branch_step(cfg: ReproduceConfig, transition: int) -> int | None:
    """Last Fixed-E checkpoint a source run of `transition` steps can continue from, if any.

    The continued run's first step still uses the learning rate computed for Fixed-E's schedule
    (train.py applies the new stage end from the next step on), so the branch must lie before the
    source's anneal starts: there both schedules give the same LR.
    """
    interval = cfg.branch_interval
    latest = transition - cfg.decay_steps(transition) - 1
    step = latest // interval * interval
    return step if step >= 1 else None


def _tag(fraction: float) -> str:
    return f"cpt{round(100 * fraction)}"


def make_plan(cfg: ReproduceConfig) -> Plan:
    arms: list[UpcycledArm] = []
    for fraction in cfg.cpt_fractions:
        rules = (cfg.select,) if fraction in (cfg.cpt_fraction, *cfg.cpt_sweep) else ()
        if fraction == cfg.selection_cpt_fraction:
            rules = tuple(dict.fromkeys((*rules, *SELECTION_RULES_COMPARED)))
        source = f"source-{_tag(fraction)}"
        for rule in rules:
            arms.append(UpcycledArm(fraction, cfg.transition_step(fraction), rule, source,
                                    f"expanded-{_tag(fraction)}-{rule}", f"upcycled-{_tag(fraction)}-{rule}"))
    main = next(a for a in arms if a.cpt_fraction == cfg.cpt_fraction and a.select == cfg.select)

    sources = {a.source: a.transition for a in arms}
    staged = None
    if cfg.growth:
        steps = tuple(cfg.growth_steps)
        staged = StagedArm(cfg.num_experts, steps, tuple(n for _, n in cfg.growth),
                           f"source-{_tag(1 - steps[0] / cfg.total_steps)}")
        sources.setdefault(staged.source, steps[0])
    stable = cfg.transition == "stable"
    branches = {name: t0 if stable else branch_step(cfg, t0) for name, t0 in sources.items()}
    steps = tuple(sorted({b for b in branches.values() if b is not None}))
    stages: list[TrainStage | BranchStage | ExpandStage] = [
        TrainStage(FIXED_E, cfg.total_steps, cfg.num_experts, save_interval=cfg.branch_interval if steps else 0),
        TrainStage(FIXED_ME, cfg.total_steps, cfg.big_experts),
    ]
    for name, t0 in sources.items():
        b = branches[name]
        if stable:
            stages.append(BranchStage(name, (FIXED_E, t0)))
        else:
            stages.append(TrainStage(name, t0, cfg.num_experts, branch=(FIXED_E, b) if b else None))
    for arm in arms:
        stages.append(ExpandStage(arm.expanded, arm.source, arm.select))
        stages.append(_cpt_stage(cfg, arm.cpt, arm.transition, arm.expanded))
    control = f"continued-e-{_tag(main.cpt_fraction)}" if cfg.control else None
    if control:
        stages.append(_cpt_stage(cfg, control, main.transition, main.source))
    if staged:
        stages += _staged_stages(cfg, staged)
    return Plan(tuple(stages), tuple(arms), main, steps, control, staged)


def _staged_stages(cfg: ReproduceConfig, arm: StagedArm) -> list:
    """Expand, train to the next growth step (exiting a stage that would end at T), expand again, ..."""
    out, previous = [], arm.source
    ends = (*arm.steps[1:], None)
    for i, (step, count, end) in enumerate(zip(arm.steps, arm.counts, ends)):
        out.append(ExpandStage(arm.expanded[i], previous, cfg.select, count))
        stage = _cpt_stage(cfg, arm.trained[i], step, arm.expanded[i])
        out.append(dataclasses.replace(stage, exit_at=end, keep_data_position=stage.keep_data_position or i > 0))
        previous = arm.trained[i]
    return out


def _cpt_stage(cfg: ReproduceConfig, name: str, transition: int, load: str) -> TrainStage:
    # With cpt_batch_split k: k times the steps of 1/k the batch, the anneal as many tokens as Fixed-E's.
    k = cfg.cpt_batch_split
    steps, micro = (cfg.total_steps - transition) * k, cfg.micro_batch_size // k if k > 1 else None
    # cpt_data "pretrain": the source's data from where it stopped, the tokens Fixed-E trains on after T0
    data = dict(split=cfg.cpt_data, keep_data_position=cfg.cpt_data == "pretrain", lr_scale=cfg.cpt_lr_scale)
    if cfg.transition == "stable":  # no re-warm; the same final anneal as Fixed-E's
        return TrainStage(name, steps, load=load, warmup=0, decay_fraction=cfg.decay_steps(cfg.total_steps) * k / steps,
                          micro_batch_size=micro, **data)
    return TrainStage(name, steps, load=load, micro_batch_size=micro, **data)
