"""Settings of one `ds-upcycle expand` run."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import ALLOCATIONS, GRADIENT_FREE_RULES, OPTIMIZER_STATE_MODES, SELECTION_RULES
from ..config import check_expert_parallel
from ..errors import UserError


@dataclass(frozen=True)
class ExpandConfig:
    """Grow every MoE layer of a checkpoint from E to N experts (or reshard it unchanged).

    Attributes:
        source, destination: checkpoint paths (a save dir with `latest`, or a tag dir; the
            destination is a new save dir).
        num_experts: target experts per layer N; or `multiplier` m, N = m * E. m = 1 reshards.
        select: how copies are allocated: "uniform" or a utility score (see scores.py).
        allocate: how a utility score becomes copy counts: "rank" (the paper's authors' rank fill:
            the best-ranked experts get up to max_copies copies each, the rest one; the default, from
            the operator swap in docs/RESULTS.md) or "proportional" (slots in proportion to the
            scores); see operator.allocate_copies.
        max_copies: cap on the copies of one expert (rank: default 4, the authors' cap).
        router_noise: standard deviation of the N(0, sigma^2) noise on the replicas' routing bias.
        router_noise_relative: sigma is router_noise times the spread of the replicas' copied biases
            (the authors' rule) instead of router_noise itself.
        optimizer_state: what replicas get of the source's Adam moments: copy, reset or scale; or
            "fresh": no Adam state for any parameter, as the authors' upcycled checkpoint holds
            (continued training starts Adam anew; fp32 master weights are kept).
        world_size, ep_size: target layout (default: the source's).
        seed: seeds the router noise; same inputs and seed give identical output.
        force: replace an existing non-empty destination.
        check_data: after writing, measure the validation loss of the source and the expanded model
            on the source's own validation data (see warmstart.py); needs the source's ds_upcycle.json.
        check_samples: validation sequences for check_data.
        data_cache: where check_data and calibration find or prepare the tokenized data (default:
            the data cache).
        calibration_data: score experts by exact gradients on this data instead of the Adam state:
            "source" (the cpt split of the source's own training data) or a data source as train.py
            takes it, tokenized with the source's tokenizer (see trained/calibration_data.py).
        calibration_batches, calibration_batch_size: the first batches of that many sequences.
        scores: a scores file written by `train.py --score-experts` for this checkpoint (every rule's
            scores, measured on the training hardware); used instead of the Adam state.
        distinct_copies: group every new expert with the other copies of its source expert in the
            model config (route_groups): a token then takes at most one copy of an expert, so the
            expanded model computes exactly what the source computed (train.py models only).
        layers: the MoE layers to grow (indices L of layer_{L}_expert_*, in module order); the
            others keep their experts (and are resharded). None: every MoE layer.
        split_copies: pull the copies of each expert apart along the direction in which the
            router inputs of its tokens vary most (measured on calibration_data, default the
            source's cpt split), so that under group routing (needs distinct_copies) each copy
            takes the tokens on its side; see operator.split_router_rows.
        split_scale: the difference between two copies' router logits for a token one standard
            deviation from the middle of the expert's tokens along that direction.
        lift_groups_after: with distinct_copies, lift the groups (a token may take two copies of an
            expert again) after this many training steps of the expanded model. The step is recorded
            in its run record (lift_groups_at), so every train.py run that continues it lifts there,
            resumed or not.
        reinit_fraction: share of each replica's hidden units (rows of its gate and up projections,
            columns of its down projection) redrawn from the model's initialisation, their Adam
            moments zeroed: 1 gives randomly initialised new experts, a fraction in between partial
            re-initialisation (Drop-Upcycling style). The first copy of every expert stays exact.
            The paper's negative baselines; 0 is its operator.
    """

    source: str
    destination: str
    num_experts: int | None = None
    multiplier: int | None = None
    select: str = "grad_sq"
    allocate: str = "rank"
    max_copies: int | None = None
    router_noise: float = 0.01
    router_noise_relative: bool = False
    optimizer_state: str = "copy"
    world_size: int | None = None
    ep_size: int | None = None
    seed: int = 0
    force: bool = False
    check_data: bool = False
    check_samples: int = 64
    data_cache: str | None = None
    calibration_data: str | None = None
    calibration_batches: int = 8
    calibration_batch_size: int = 8
    scores: str | None = None
    layers: tuple[int, ...] | None = None
    distinct_copies: bool = False
    split_copies: bool = False
    split_scale: float = 0.5
    lift_groups_after: int | None = None
    reinit_fraction: float = 0.0

    def __post_init__(self) -> None:
        if (self.num_experts is None) == (self.multiplier is None):
            raise UserError("give exactly one of --num-experts and --multiplier")
        if self.multiplier is not None and self.multiplier < 1:
            raise UserError(f"--multiplier must be >= 1, got {self.multiplier}")
        if self.select not in SELECTION_RULES:
            raise UserError(f"--select must be one of {', '.join(SELECTION_RULES)}, got {self.select!r}")
        if self.allocate not in ALLOCATIONS:
            raise UserError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        if self.optimizer_state not in OPTIMIZER_STATE_MODES:
            raise UserError(f"--optimizer-state must be one of {', '.join(OPTIMIZER_STATE_MODES)}")
        if self.router_noise < 0:
            raise UserError("--router-noise must be >= 0")
        if self.check_samples < 1:
            raise UserError(f"--check-samples must be >= 1, got {self.check_samples}")
        if self.split_copies and not self.distinct_copies:
            raise UserError("--split-copies needs --distinct-copies: without group routing a token takes both "
                            "copies of an expert, whichever side of the split it lies on")
        if self.lift_groups_after is not None:
            if not self.distinct_copies:
                raise UserError("--lift-groups-after lifts the groups of --distinct-copies; give that too")
            if self.lift_groups_after < 1:
                raise UserError(f"--lift-groups-after must be >= 1, got {self.lift_groups_after}")
        if not 0 <= self.reinit_fraction <= 1:
            raise UserError(f"--reinit-fraction must lie in [0, 1], got {self.reinit_fraction}")
        if not self.split_scale > 0:
            raise UserError(f"--split-scale must be > 0, got {self.split_scale}")
        if self.calibration_data is not None:
            if not self.calibration_data.strip():
                raise UserError("--calibration-data is empty; give 'source' or a data source")
            if self.select in GRADIENT_FREE_RULES and not self.split_copies:
                # Refused rather than ignored: the user asked for gradients that would not be used.
                using = ", ".join(r for r in SELECTION_RULES if r not in GRADIENT_FREE_RULES)
                raise UserError(f"--select {self.select} uses no gradients, so --calibration-data has no effect; "
                                f"leave it out or choose {using} (or --split-copies)")
        if self.scores is not None:
            if self.select == "uniform":
                raise UserError("--select uniform uses no scores, so --scores has no effect; leave it out or "
                                "choose a rule the file holds")
            if self.uses_gradients:
                raise UserError("give one of --scores (measured by train.py --score-experts) and --calibration-data "
                                "(measured here)")
        if self.layers is not None:
            if not self.layers or any(layer < 0 for layer in self.layers) or len(set(self.layers)) < len(self.layers):
                raise UserError(f"--layers must list distinct MoE layer indices >= 0, got {list(self.layers)}")
            if self.multiplier == 1:
                raise UserError("--layers chooses layers to grow; --multiplier 1 grows none")
        for name in ("world_size", "ep_size", "max_copies", "calibration_batches", "calibration_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    @property
    def uses_gradients(self) -> bool:
        """Scores come from calibration gradients (not the Adam state)."""
        return self.calibration_data is not None and self.select not in GRADIENT_FREE_RULES

    @property
    def split_data(self) -> str:
        """Where split_copies measures its directions."""
        return self.calibration_data if self.calibration_data is not None else "source"

    def target_experts_of(self, layer: int, source_experts: int) -> int:
        """Target experts of MoE layer `layer`: grown if chosen, else unchanged."""
        if self.layers is not None and layer not in self.layers:
            return source_experts
        return self.target_experts(source_experts)

    def check_layers(self, num_layers: int) -> None:
        beyond = sorted(layer for layer in self.layers or () if layer >= num_layers)
        if beyond:
            raise UserError(f"--layers {beyond[0]}: the source has {num_layers} MoE layers (0 to {num_layers - 1})")

    def target_experts(self, source_experts: int) -> int:
        target = self.num_experts if self.num_experts is not None else self.multiplier * source_experts
        if target < source_experts or (self.num_experts is not None and target == source_experts):
            raise UserError(f"--num-experts {target} must be larger than the source's {source_experts} experts "
                            f"(use --multiplier 1 to reshard unchanged)")
        return target

    def target_layout(self, source_world: int, source_ep: int, target_experts: int) -> tuple[int, int]:
        world = self.world_size or source_world
        ep = self.ep_size or source_ep
        # Named as the user gives them: the options, or the source's layout where an option was left out.
        ep_name = "--ep-size" if self.ep_size else "the source's ep_size (--ep-size)"
        world_name = "--world-size" if self.world_size else "the source's world size (--world-size)"
        check_expert_parallel(ep, [target_experts], world, ep_name, world_name)
        return world, ep


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'0,2' -> (0, 2); None or empty -> None (every layer)."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--layers takes comma-separated MoE layer indices such as 0,2; got {text!r}") from None
