"""Settings of one reproduction of the paper's central experiment, named or read from a file.

A config fixes everything the arms share (model, data, batch, total steps T) so that Fixed-E,
Upcycled and Fixed-mE differ only in what the experiment varies: the expert count over time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..choices import ALLOCATIONS, DTYPE_NAMES, GRADIENT_FREE_RULES, OPTIMIZER_STATE_MODES, SELECTION_RULES
from ..config import PRESETS, check_expert_parallel, field_value
from ..data.config import DataConfig
from ..errors import UserError, did_you_mean
from ..upcycle.config import ExpandConfig


TRANSITIONS = ("annealed", "stable")
CPT_DATA = ("cpt", "pretrain")


@dataclass(frozen=True)
class ReproduceConfig:
    """One experiment: E -> m*E experts at the same total token budget.

    Attributes:
        name: label used in tables and plots.
        model: model preset (see `ds-upcycle presets`); `model_overrides` are train.py `--set`
            items applied to every arm (the expert count is set per arm from `num_experts`).
        num_experts, multiplier: E and m; the big model has m * E experts at the same top-K.
        total_steps: T, optimizer steps of every arm (same global batch, so the same tokens).
        cpt_fraction: share of T's steps spent in continued pre-training by the main upcycled arm,
            (T - T0) / T (a step share; the share of documents in the cpt data split is
            cpt_split_fraction, train.py's --cpt-fraction).
        selection_cpt_fraction: a shorter CPT budget at which uniform and grad_sq selection are
            compared (None: skip that comparison).
        cpt_sweep: further CPT shares at which the main selection rule runs too: gap closure
            against the CPT budget, which at a fixed T is also the transition step T0 = (1 - share) T.
        select: selection rule of the main upcycled arm.
        control: also continue the main arm's E-expert source for the same CPT steps, schedule and
            data without expanding it, which separates the operator's effect from the two-stage
            schedule's.
        router_noise: sigma of the replicas' routing-bias noise at expansion.
        router_noise_relative: expand with `--router-noise-relative` (sigma relative to the spread of
            the copied biases, the paper's code).
        allocate: expand with `--allocate` (the paper's "rank" fill or "proportional"); the named
            configs keep "proportional", the rule their recorded results used.
        optimizer_state: expand with `--optimizer-state` ("copy", "reset", "scale", or "fresh": CPT
            starts Adam anew, as the paper's code does).
        calibration_data: expand with `--calibration-data` (e.g. "source": utility scores from exact
            gradients on the source's cpt split instead of its Adam state); gradient-free rules
            (uniform) ignore it.
        distinct_copies: expand with `--distinct-copies` (a token takes at most one copy of an
            expert); False runs the paper's plain operator.
        split_copies: expand with `--split-copies` too (each expert's copies split its tokens
            along their main direction of variation; needs distinct_copies).
        lift_groups_after: with distinct_copies, expand with `--lift-groups-after`: the copies'
            groups are lifted after this many CPT steps. None: they stay.
        reinit_fraction: expand with `--reinit-fraction` (the paper's negative baselines: 1 gives
            randomly initialised replicas, a fraction in between partial re-initialisation).
        growth: one more arm, grown in stages: each (share of T, experts) grows every MoE layer to
            that many experts at that step, the counts rising to m * E (e.g. [[0.25, 6], [0.5, 8]]).
            The first growth takes Fixed-E's stable-phase checkpoint (transition "stable"); every
            stage runs at peak LR and is the first part of a stage that would end at T with
            Fixed-E's anneal, so the next growth takes a stable-phase checkpoint too, and each stage
            continues the data of the one before. Compared with the main arm's single jump.
        transition: "annealed" (the paper's protocol: the E-expert source ends with its own
            anneal at T0, and CPT warms up again and anneals at its end) or "stable" (the source is
            Fixed-E's own checkpoint at T0, taken in its stable phase, and CPT continues at the
            peak learning rate without warmup, ending with an anneal as long as Fixed-E's).
        cpt_data: what continued pre-training (and the control) trains on: "cpt", the split of
            documents set aside for it (the paper's protocol), or "pretrain", the source's own data
            continued from where it stopped at T0, so that every arm sees the same tokens as Fixed-E
            (where the data repeat, CPT on other documents would also be CPT on more text).
        data, text_field, seq_len, vocab_size, val_fraction, cpt_split_fraction: training data
            (train.py --data, --text-field, --seq-len, --vocab-size, --val-fraction, --cpt-fraction;
            defaults as train.py's); splits are assigned per document by a hash.
        deepspeed_config: a DeepSpeed JSON file (a path, or a name in the repository's ds_configs/).
        num_procs, ep_size: processes per training stage and expert-parallel size.
        micro_batch_size, grad_accum_steps: per process; the global batch is their product times
            num_procs.
        cpt_batch_split: continued pre-training (and the control) runs at micro_batch_size / k for
            k times the steps, at the same learning rate: the same tokens in more, smaller steps.
        cpt_lr_scale: continued pre-training (and the control) at this multiple of the DeepSpeed
            config's learning rate (e.g. 1 / sqrt(2) with cpt_batch_split 2, the square-root rule
            for half the batch); 1: the same learning rate.
        warmup_fraction, decay_fraction: warmup-stable-decay shape of every stage (each stage ends
            with its own anneal, as in the paper).
        eval_interval, eval_samples: validation during training (the curves of the loss plot);
            the warm-start jump is measured on the same first eval_samples sequences.
        final_val_samples: validation sequences of the final evaluation of every arm.
        tasks, task_limit: lm-eval tasks for the final evaluation (() for validation loss only)
            and documents per task.
        eval_device, eval_dtype, eval_batch_size: where the final evaluation runs.
        threads: torch threads per training process (OMP_NUM_THREADS).
        seed: model init, data order and router noise.
        seeds: run the whole experiment once per seed, each in OUT/seed-<s>/ (as many at a time
            as the cores allow), and report every figure as mean +- std with the per-seed values;
            () runs `seed` alone in OUT.
    """

    name: str
    model: str = "tiny"
    model_overrides: tuple[str, ...] = ()
    num_experts: int = 4
    multiplier: int = 2
    total_steps: int = 400
    cpt_fraction: float = 0.5
    selection_cpt_fraction: float | None = 0.25
    cpt_sweep: tuple[float, ...] = ()
    select: str = "grad_sq"
    control: bool = True
    router_noise: float = 0.01
    router_noise_relative: bool = False
    allocate: str = ExpandConfig.allocate
    optimizer_state: str = "copy"
    calibration_data: str | None = None
    distinct_copies: bool = False
    split_copies: bool = False
    lift_groups_after: int | None = None
    reinit_fraction: float = 0.0
    growth: tuple[tuple[float, int], ...] = ()
    transition: str = "annealed"
    cpt_data: str = "cpt"
    data: str | None = DataConfig.source
    text_field: str = DataConfig.text_field
    seq_len: int = DataConfig.seq_len
    vocab_size: int = DataConfig.vocab_size
    val_fraction: float = DataConfig.val_fraction
    cpt_split_fraction: float = DataConfig.cpt_fraction
    deepspeed_config: str = "zero2_fp32.json"
    num_procs: int = 1
    ep_size: int = 1
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    cpt_batch_split: int = 1
    cpt_lr_scale: float = 1.0
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.1
    eval_interval: int = 50
    eval_samples: int = 128
    final_val_samples: int = 256
    tasks: tuple[str, ...] = ("synthetic",)
    task_limit: int | None = 64
    eval_device: str = "cpu"
    eval_dtype: str = "float32"
    eval_batch_size: int = 8
    threads: int = 1
    seed: int = 0
    seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise UserError(f"unknown model preset {self.model!r}{did_you_mean(self.model, PRESETS)}")
        if self.num_experts < 1 or self.multiplier < 2:
            raise UserError(f"need num_experts >= 1 and multiplier >= 2, got {self.num_experts} and {self.multiplier}")
        if self.total_steps < 8:
            raise UserError(f"total_steps must be >= 8, got {self.total_steps}")
        for name in ("cpt_fraction", "selection_cpt_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise UserError(f"{name} must lie strictly between 0 and 1, got {value}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in self.cpt_sweep):
            raise UserError(f"cpt_sweep must hold shares strictly between 0 and 1, got {list(self.cpt_sweep)}")
        for fraction in self.cpt_fractions:
            if not 0 < self.transition_step(fraction) < self.total_steps:
                raise UserError(f"cpt_fraction {fraction} leaves no steps on one side of the transition "
                                f"at total_steps {self.total_steps}")
        if self.select not in SELECTION_RULES:
            raise UserError(f"select must be one of {', '.join(SELECTION_RULES)}, got {self.select!r}")
        if self.transition not in TRANSITIONS:
            raise UserError(f"transition must be one of {', '.join(TRANSITIONS)}, got {self.transition!r}")
        if self.cpt_data not in CPT_DATA:
            raise UserError(f"cpt_data must be one of {', '.join(CPT_DATA)}, got {self.cpt_data!r}")
        if self.split_copies and not self.distinct_copies:
            raise UserError("split_copies needs distinct_copies: without group routing a token takes both copies")
        if self.lift_groups_after is not None and (not self.distinct_copies or self.lift_groups_after < 1):
            raise UserError(f"lift_groups_after lifts the groups of distinct_copies (set that too) after >= 1 CPT "
                            f"steps, got {self.lift_groups_after}")
        if not 0 <= self.reinit_fraction <= 1:
            raise UserError(f"reinit_fraction must lie in [0, 1], got {self.reinit_fraction}")
        if self.transition == "stable":
            for fraction in self.cpt_fractions:
                t0 = self.transition_step(fraction)
                if t0 > self.total_steps - self.decay_steps(self.total_steps):
                    raise UserError(f"transition stable: cpt_fraction {fraction} puts T0 = {t0} inside Fixed-E's "
                                    f"final anneal (from step {self.total_steps - self.decay_steps(self.total_steps)})")
                if t0 % self.branch_interval:
                    raise UserError(f"transition stable: T0 = {t0} (cpt_fraction {fraction}) is not a multiple of "
                                    f"Fixed-E's checkpoint interval {self.branch_interval} (total_steps / 20)")
        if self.growth:
            self._check_growth()
        if self.router_noise < 0:
            raise UserError(f"router_noise must be >= 0, got {self.router_noise}")
        if self.allocate not in ALLOCATIONS:
            raise UserError(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        if self.optimizer_state not in OPTIMIZER_STATE_MODES:
            raise UserError(f"optimizer_state must be one of {', '.join(OPTIMIZER_STATE_MODES)}, "
                            f"got {self.optimizer_state!r}")
        if self.calibration_data is not None and self.select in GRADIENT_FREE_RULES:
            raise UserError(f"calibration_data measures gradients, which select {self.select} does not use")
        if self.data is not None and not self.data.strip():
            raise UserError("data must name a data source")
        check_expert_parallel(self.ep_size, [self.num_experts], self.num_procs, world_name="num_procs")
        if self.cpt_batch_split < 1 or self.micro_batch_size % self.cpt_batch_split:
            raise UserError(f"cpt_batch_split must divide micro_batch_size {self.micro_batch_size}, "
                            f"got {self.cpt_batch_split}")
        if not self.cpt_lr_scale > 0:
            raise UserError(f"cpt_lr_scale must be > 0, got {self.cpt_lr_scale}")
        for name in ("micro_batch_size", "grad_accum_steps", "seq_len", "eval_samples", "final_val_samples",
                     "eval_batch_size", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_interval < 0:
            raise UserError(f"eval_interval must be >= 0, got {self.eval_interval}")
        if not 0 <= self.warmup_fraction < 1 or not 0 < self.decay_fraction < 1:
            raise UserError("warmup_fraction must lie in [0, 1) and decay_fraction in (0, 1)")
        if self.task_limit is not None and self.task_limit < 1:
            raise UserError(f"task_limit must be >= 1, got {self.task_limit}")
        if "synthetic" in self.tasks and self.data is not None and not self.data.startswith("synthetic"):
            raise UserError("the synthetic tasks ask about the built-in corpus; use tasks: [] (validation loss "
                            "only) or lm-eval tasks for other data")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds) or \
                len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        if self.eval_dtype not in DTYPE_NAMES:
            raise UserError(f"eval_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.eval_dtype!r}")

    def _check_growth(self) -> None:
        shares, counts = [f for f, _ in self.growth], [n for _, n in self.growth]
        if any(not 0 < f < 1 for f in shares) or shares != sorted(set(shares)):
            raise UserError(f"growth: the shares of T must rise strictly between 0 and 1, got {shares}")
        if counts != sorted(set(counts)) or counts[0] <= self.num_experts or counts[-1] != self.big_experts:
            raise UserError(f"growth: the expert counts must rise from above num_experts {self.num_experts} to "
                            f"num_experts * multiplier = {self.big_experts}, got {counts}")
        if self.transition != "stable":
            raise UserError("growth takes Fixed-E's stable-phase checkpoint: set transition: stable")
        if self.cpt_batch_split > 1:
            raise UserError("growth stages end at growth steps counted in Fixed-E's steps: leave cpt_batch_split at 1")
        steps, anneal = self.growth_steps, self.total_steps - self.decay_steps(self.total_steps)
        if steps[0] % self.branch_interval or steps[-1] > anneal or len(set(steps)) < len(steps):
            raise UserError(f"growth steps {steps}: the first must be a multiple of Fixed-E's checkpoint interval "
                            f"{self.branch_interval}, all distinct and before the final anneal (step {anneal})")
        check_expert_parallel(self.ep_size, counts, self.num_procs, world_name="num_procs")

    @property
    def growth_steps(self) -> list[int]:
        return [round(share * self.total_steps) for share, _ in self.growth]

    @property
    def big_experts(self) -> int:
        return self.num_experts * self.multiplier

    @property
    def cpt_fractions(self) -> tuple[float, ...]:
        extra = () if self.selection_cpt_fraction is None else (self.selection_cpt_fraction,)
        return tuple(dict.fromkeys((self.cpt_fraction, *extra, *self.cpt_sweep)))

    def transition_step(self, cpt_fraction: float) -> int:
        """T0 for a CPT share of the total budget."""
        return round(self.total_steps * (1 - cpt_fraction))

    @property
    def branch_interval(self) -> int:
        """Steps between the Fixed-E checkpoints that source runs start from."""
        return max(1, self.total_steps // 20)

    def stage_warmup(self, steps: int) -> int:
        return max(1, round(self.warmup_fraction * steps))

    def decay_steps(self, steps: int) -> int:
        """Steps of the final anneal of a stage of `steps` steps (as training/schedule.py counts them)."""
        return max(1, round(self.decay_fraction * steps))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The router of the recorded pd-english reproduction (docs/RESULTS.md); the model default became
# softmax later, and that config keeps sigmoid so that it still reproduces those numbers.
SIGMOID = "score_func=sigmoid"

# The allocation rule the named configs' recorded results used (expand's default is now "rank").
PROPORTIONAL = "proportional"

NAMED_CONFIGS: dict[str, ReproduceConfig] = {
    # The experiment in miniature: 4 -> 8 experts, one CPU process each, three seeds, in a regime where
    # 8 experts beat 4 clearly (docs/RESULTS.md): small experts against a corpus of 19,200 facts of
    # 6 bits each. The transition is taken in Fixed-E's stable phase, and the main rule also runs at
    # 10%, 75% and 90% CPT: gap closure against the CPT budget (= transition step at fixed T).
    "tiny": ReproduceConfig(
        name="tiny", model_overrides=("dim=32", "n_heads=2", "n_kv_heads=1", "expert_ffn_dim=16", "dense_ffn_dim=64",
                                      "n_layers=2"),
        data="synthetic:entities=400,values=64", total_steps=4800, eval_interval=600, transition="stable",
        cpt_sweep=(0.1, 0.75, 0.9), seeds=(0, 1, 2), allocate=PROPORTIONAL),
    # The `tiny` model where its lead is built the way it is in pre-training: one pass over a stream
    # of records whose entities (2,000 per domain: 96,000 facts, 576,000 bits, 9-15 times what
    # either model can hold at 2 bits per parameter) are mentioned with Zipf popularity, so that
    # the set of facts seen often enough to be learnt keeps growing with tokens (docs/RESULTS.md,
    # "A streaming regime").
    "stream": ReproduceConfig(
        name="stream", model_overrides=("dim=32", "n_heads=2", "n_kv_heads=1", "expert_ffn_dim=16",
                                        "dense_ffn_dim=64", "n_layers=2"),
        data="synthetic:docs=240000,entities=2000,values=64", total_steps=4800, eval_interval=600,
        transition="stable", cpt_sweep=(0.1, 0.75, 0.9), seeds=(0, 1, 2, 3), allocate=PROPORTIONAL),
    # Real text (pass its directory with --data): a small interleaved model, 8 -> 16 experts,
    # top-2. Each .txt file is one document, so the hash split holds out whole works.
    "pd-english": ReproduceConfig(
        name="pd-english", model="small", model_overrides=("dim=192", "dense_ffn_dim=512", "expert_ffn_dim=256",
                                                           "n_layers=4", SIGMOID),
        num_experts=8, multiplier=2, total_steps=600, data=None, seq_len=128, vocab_size=4096,
        val_fraction=0.12, cpt_split_fraction=0.35, micro_batch_size=16, eval_interval=50, eval_samples=64,
        final_val_samples=256, tasks=(), task_limit=None, allocate=PROPORTIONAL),
    # One GPU, bf16: the paper's interleaved layout at 8 layers, 16 -> 32 experts.
    "gpu": ReproduceConfig(
        name="gpu", model="paper-il8", num_experts=16, multiplier=2, total_steps=4000, seq_len=512,
        vocab_size=8192, deepspeed_config="zero2_bf16.json", micro_batch_size=32, eval_interval=200,
        eval_samples=256, final_val_samples=512, task_limit=None, eval_device="cuda", eval_dtype="bfloat16",
        eval_batch_size=32, threads=4, allocate=PROPORTIONAL),
}

# `stream` with one more arm, grown in stages: 4 -> 6 experts at 25% of T, 6 -> 8 at 50%, compared with
# the single jump at 50% (docs/RESULTS.md, "Growth in stages"). Its Fixed arms are stream's.
NAMED_CONFIGS["stream-staged"] = dataclasses.replace(NAMED_CONFIGS["stream"], name="stream-staged",
                                                     growth=((0.25, 6), (0.5, 8)))

_FIELDS = {f.name: f for f in dataclasses.fields(ReproduceConfig)}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError both subclass it or Exception
        raise UserError(f"config {path} is not valid {path.suffix.lstrip('.').upper()}: {err}") from None
    except Exception as err:  # yaml.YAMLError
        raise UserError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must hold a mapping of field: value")
    return data


def config_from_dict(data: dict, origin: str, bases: tuple[Path, ...] = ()) -> ReproduceConfig:
    """A config from a mapping read from the file `origin`; `base: NAME` starts from a named config,
    `base: FILE.yaml` from another config file (relative to origin's folder), and changes some fields.
    `bases`: the files already on this chain of bases, which must not come round again."""
    data = dict(data)
    base = data.pop("base", None)
    values = dataclasses.asdict(base_config(base, origin, bases)) if base is not None else {}
    for key, value in data.items():
        if key not in _FIELDS:
            raise UserError(f"{origin}: unknown field {key!r}{did_you_mean(key, _FIELDS)}")
        if key == "growth":
            values[key] = growth_value(value)
            continue
        try:
            values[key] = field_value(_FIELDS[key], value)
        except ValueError as err:
            raise UserError(f"config field {key} must be {err}, got {value!r}") from None
    values.setdefault("name", Path(origin).stem)
    try:
        return ReproduceConfig(**values)
    except TypeError as err:
        raise UserError(f"{origin}: {err}") from None


def base_config(base, origin: str, bases: tuple[Path, ...]) -> ReproduceConfig:
    """The config that `base:` in the file `origin` names: a named config or a config file."""
    if not isinstance(base, str) or not base:
        raise UserError(f"{origin}: base must name a config, got {base!r}")
    if base in NAMED_CONFIGS:
        return NAMED_CONFIGS[base]
    path = Path(origin).parent / base
    if path.suffix not in CONFIG_SUFFIXES:
        raise UserError(f"{origin}: unknown base config {base!r}; choose from {', '.join(NAMED_CONFIGS)} "
                        f"or give a .yaml/.json file")
    if not path.is_file():
        raise UserError(f"{origin}: base config file not found: {path}")
    chain = (*bases, Path(origin).resolve())
    if path.resolve() in chain:
        raise UserError(f"{origin}: its bases come round to {path} again")
    return config_from_dict(_read_file(path), str(path), chain)


def growth_value(value) -> tuple[tuple[float, int], ...]:
    """[[share, experts], ...] from a config file (none or [] for no staged arm)."""
    if value is None:
        return ()
    pairs = value if isinstance(value, (list, tuple)) else [None]
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (int, float))
               and isinstance(p[1], int) and not isinstance(p[1], bool) for p in pairs):
        raise UserError(f"config field growth must be a list of [share of T, experts] pairs, got {value!r}")
    return tuple((float(share), count) for share, count in pairs)


def require_data(cfg: ReproduceConfig) -> None:
    """Refuse, before any stage starts, a config that names no data (pd-english: pass --data)."""
    if cfg.data is None:
        raise UserError(f"config {cfg.name} needs --data: the directory or file of text to train on")


def load_config(name_or_file: str, **changes) -> ReproduceConfig:
    """A named config (NAMED_CONFIGS) or a .yaml/.yml/.json file; `changes` replace fields."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if name_or_file in NAMED_CONFIGS:
        cfg = NAMED_CONFIGS[name_or_file]
        data = dataclasses.asdict(cfg)
        data.update(changes)
        return ReproduceConfig(**data)
    path = Path(name_or_file)
    if path.suffix not in CONFIG_SUFFIXES:
        raise UserError(f"unknown config {name_or_file!r}{did_you_mean(name_or_file, NAMED_CONFIGS)}; choose from "
                        f"{', '.join(NAMED_CONFIGS)} or give a .yaml/.json file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return config_from_dict({**_read_file(path), **changes}, str(path))
