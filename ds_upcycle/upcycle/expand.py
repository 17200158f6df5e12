"""`ds-upcycle expand`: read a checkpoint, plan the expansion, write it for a layout, report.

The checkpoint package knows DeepSpeed's files; the operator knows the method; this module joins
them in four steps whose results are values: `open_source` (the checkpoint and, when needed, its
data), `plan_expansion` (target layout, scores, allocation: everything decided before a byte is
written), `write_expansion` (the new checkpoint and its manifest, atomically) and `check_warm_start`.
`ExpandedSource` presents the expanded model as a checkpoint source that the writer consumes one
expert at a time, so no more than the source's lazily read tensors are held at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import deepspeed
import torch

from .. import __version__
from ..atomic import check_destination, write_json_atomic
from ..checkpoint import (CheckpointReader, CheckpointSource, MoELayer, NonExpertState, ParamState, ProgressSource,
                          RunRecord, autoep_score_func, read_checkpoint, write_checkpoint)
from ..errors import UserError
from ..model import init_std
from ..trained import RunData
from ..trained.calibration_data import check_calibration_source
from ..trained.scores import ExpertScores, GradientStats, expert_score
from .calibration import calibrate
from .config import ExpandConfig
from .operator import (NOISE_ON_BIAS, LayerExpansion, LayerPlan, copy_groups, copy_moment, expand_router, expand_rows,
                       plan_layer, redraw, redrawn_units, route_bias_scale)
from .split import measure_splits
from .warmstart import WarmStart, warm_start

MANIFEST = "upcycle_manifest.json"


def layer_scores(source: CheckpointSource, layer: MoELayer, rule: str,
                 measured: ExpertScores | None = None) -> list[float] | None:
    """Utility of each expert: measured on data if given (calibration, or a scores file), else from
    the checkpoint's Adam state (no data needed)."""
    if rule == "uniform":
        return None
    if measured is not None:
        return measured.layer(layer.prefix, layer.num_experts, rule)
    if source.meta.optimizer_step is None:
        raise UserError(f"--select {rule} reads the checkpoint's Adam state, but it has none (saved before the "
                        f"first step, or imported); score it on data (train.py --score-experts on the training "
                        f"hardware, then --scores FILE; or --calibration-data DATA here), or use --select uniform")
    scores = []
    for expert in range(layer.num_experts):
        params = source.expert_state(layer.index, expert)
        stats = GradientStats.from_adam({k: p.fp32 for k, p in params.items()},
                                        {k: p.exp_avg for k, p in params.items()},
                                        {k: p.exp_avg_sq for k, p in params.items()})
        scores.append(expert_score(rule, stats))
    return scores


def make_plans(source: CheckpointSource, cfg: ExpandConfig, ep_size: int,
               measured: ExpertScores | None = None) -> dict[int, LayerPlan]:
    plans = {}
    for layer in source.moe_layers:
        target = cfg.target_experts_of(layer.index, layer.num_experts)
        # A layer that keeps its experts needs no scores: there is nothing to allocate.
        rule = cfg.select if target > layer.num_experts else "uniform"
        plans[layer.index] = plan_layer(layer.num_experts, target, layer_scores(source, layer, rule, measured),
                                        cfg.max_copies, ep_size, cfg.allocate)
    return plans


def score_origin(cfg: ExpandConfig, measured: ExpertScores | None) -> dict:
    """Where the utility scores came from, for the manifest."""
    if cfg.select == "uniform":
        return {"from": "none (uniform)"}
    if measured is None:
        return {"from": "adam state"}
    return {**measured.info, **({"file": str(Path(cfg.scores).resolve())} if cfg.scores else {})}


def measured_scores(cfg: ExpandConfig, source: CheckpointReader, run: RunData | None) -> ExpertScores | None:
    """Scores measured on data: read from --scores, or computed here from --calibration-data."""
    if cfg.scores is not None:
        with _blamed_on("--scores"):
            scores = ExpertScores.read(cfg.scores)
            scores.check_scored(Path(source.path).name, source.meta.global_steps, source.path)
            for layer in source.moe_layers:  # every layer checked before any work
                if cfg.target_experts_of(layer.index, layer.num_experts) > layer.num_experts:
                    scores.layer(layer.prefix, layer.num_experts, cfg.select)
        return scores
    if cfg.uses_gradients:
        with _blamed_on("--calibration-data"):
            return calibrate(source, run, cfg.calibration_data, cfg.calibration_batches, cfg.calibration_batch_size)
    return None


class ExpandedSource:
    """The expanded checkpoint, computed on demand from the source (implements CheckpointSource).

    Plumbing only: each tensor comes from the source and goes through the operator as the plan says.
    """

    def __init__(self, plan: ExpansionPlan, cfg: ExpandConfig) -> None:
        self.source, self.layers, self.cfg = plan.source, plan.layers, cfg
        self.moe_layers = [layer.with_experts(plan.layers[layer.index].plan.num_target)
                           for layer in self.source.moe_layers]
        self.meta = replace(self.source.meta, run_record=_expanded_record(plan, cfg))
        if cfg.optimizer_state == "fresh":
            # An optimizer without state, as DeepSpeed saves one before its first step: the writer then
            # writes no moments and no step, and the next step is a new Adam's first.
            self.meta = replace(self.meta, optimizer_step=None)

    def non_expert_state(self) -> NonExpertState:
        state = self.source.non_expert_state()
        params, buffers, mode = dict(state.params), dict(state.buffers), self.cfg.optimizer_state
        # One generator walked in layer order: the same seed gives the same noise.
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for layer in self.source.moe_layers:
            weight_name, bias_name = layer.router_weight, layer.router_bias
            if weight_name not in params:
                raise UserError(f"{layer.prefix}: no router weight {weight_name} in the checkpoint")
            weight, expansion = params[weight_name], self.layers[layer.index]
            rows, bias = expand_router(weight.fp32, buffers.get(bias_name), expansion, self.cfg.router_noise, gen,
                                       self.cfg.split_scale, self.cfg.router_noise_relative)
            params[weight_name] = ParamState(rows, *(None if t is None else expand_rows(t, expansion.plan, m, mode)
                                                     for m, t in _moments(weight)))
            if bias is not None:
                buffers[bias_name] = bias
        if mode == "fresh":
            params = {name: ParamState(state.fp32) for name, state in params.items()}
        return NonExpertState(params, buffers)

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        plan, mode = self.layers[layer].plan, self.cfg.optimizer_state
        # The reader assembles new tensors on every call, so they can be handed on without copying.
        state = {name: ParamState(state.fp32, *(copy_moment(t, plan, expert, m, mode) for m, t in _moments(state)))
                 for name, state in self.source.expert_state(layer, plan.sources[expert]).items()}
        if self.cfg.reinit_fraction > 0 and bool(plan.replicas[expert]):
            state = self._reinitialised(state, layer, expert)
        return state

    def _reinitialised(self, state: dict[str, ParamState], layer: int, expert: int) -> dict[str, ParamState]:
        """A replica with cfg.reinit_fraction of its hidden units drawn as the model initialises them
        (model.init_std, the rule of init_weights) and their moments zeroed; seeded by (seed, layer,
        expert), as the writer may ask twice."""
        model = self.meta.run_record.model
        if set(state) != {*HIDDEN_ROWS, *HIDDEN_COLUMNS}:
            raise UserError(f"--reinit-fraction: MoE layer {layer}'s experts hold {sorted(state)}, not a train.py "
                            f"SwiGLU expert's {[*HIDDEN_ROWS, *HIDDEN_COLUMNS]}")
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + layer * 10_007 + expert)
        units = redrawn_units(state[HIDDEN_ROWS[0]].fp32.shape[0], self.cfg.reinit_fraction, gen)
        out = {}
        for name, param in state.items():
            dim = 0 if name in HIDDEN_ROWS else 1
            std = init_std(model, name)
            moments = (None if t is None else redraw(t, units, dim, 0.0, gen) for _, t in _moments(param))
            out[name] = ParamState(redraw(param.fp32, units, dim, std, gen), *moments)
        return out


# A train.py expert's weights with one row per hidden unit; its down projection has one column each.
HIDDEN_ROWS, HIDDEN_COLUMNS = ("w_gate.weight", "w_up.weight"), ("w_down.weight",)


def _moments(state: ParamState):
    """(moment, tensor) of a parameter's Adam moments, in ParamState's order."""
    return (1, state.exp_avg), (2, state.exp_avg_sq)


def _expanded_record(plan: ExpansionPlan, cfg: ExpandConfig) -> RunRecord | None:
    """The source's run record with the new expert counts, the source expert of every expert and,
    with distinct copies, every new expert grouped with the other copies of its source expert."""
    record = plan.source.meta.run_record
    if record is None:
        return None
    layers = [plan.layers[layer.index].plan for layer in plan.source.moe_layers]
    old_groups = record.model.route_groups or [None] * len(layers)
    groups = [copy_groups(old, layer) for old, layer in zip(old_groups, layers)] if cfg.distinct_copies else None
    expanded = record.with_experts([layer.num_target for layer in layers], groups)
    # A lift belongs to the groups of one expansion: a reshard keeps a pending one, growing replaces it.
    grows = any(layer.num_target > layer.num_source for layer in layers)
    lift = (plan.source.meta.global_steps + cfg.lift_groups_after if cfg.lift_groups_after is not None
            else None if grows else record.lift_groups_at)
    return replace(expanded, copy_of=tuple(layer.sources for layer in layers), lift_groups_at=lift)


def router_noise_target(source: CheckpointSource, layer: MoELayer, noise: float) -> str:
    """Where a layer's router noise goes: the routing bias if the model has one and trains it
    (loss-free balancing), else the router rows, so that an untrained bias stays what it was (zero
    for a model imported from a class without one, which it then still exports to)."""
    record = source.meta.run_record
    has_bias = layer.router_bias in source.meta.buffer_names
    if has_bias and (record is None or record.model.route_bias_update > 0):
        return NOISE_ON_BIAS
    if noise == 0:
        return "none"
    return "router weight rows (" + ("the routing bias is not trained)" if has_bias else "no routing bias)")


@dataclass(frozen=True)
class ExpansionPlan:
    """Everything decided before a byte is written."""

    source: CheckpointReader
    run: RunData | None          # the source's training data, when a check or calibration needs it
    tag: str
    world_size: int              # target layout
    ep_size: int
    layers: dict[int, LayerExpansion]   # by MoE layer index
    scores: dict                 # where the utility scores came from
    split_info: dict | None = None      # with split_copies: the data the directions were measured on


@dataclass
class ExpandResult:
    destination: Path
    tag: str
    plans: dict[int, LayerPlan]     # by MoE layer index
    manifest: dict
    warm_start: WarmStart | None = None


@contextmanager
def _blamed_on(option: str) -> Iterator[None]:
    """Errors raised inside name the option whose work failed."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{option}: {err}") from None


def open_source(cfg: ExpandConfig) -> tuple[CheckpointReader, RunData | None]:
    """The source checkpoint, and its data if the options need it; refused before anything is written."""
    source = read_checkpoint(cfg.source)
    if Path(source.path).resolve().is_relative_to(Path(cfg.destination).resolve()):
        raise UserError(f"destination {cfg.destination} would overwrite the source checkpoint {source.path}")
    if not source.moe_layers:
        raise UserError(f"{source.path} has no MoE layers to expand")
    cfg.check_layers(len(source.moe_layers))
    _check_groups(cfg, source)
    if cfg.reinit_fraction > 0 and (source.meta.run_record is None or any(layer.autoep for layer in source.moe_layers)):
        raise UserError("--reinit-fraction draws new weights as train.py initialises them, which needs a train.py "
                        "model's ds_upcycle.json (this checkpoint has none, or AutoEP experts)")
    run = None
    needs = (("--check-data", cfg.check_data), ("--calibration-data", cfg.calibration_data is not None),
             ("--split-copies", cfg.split_copies))
    for option, wanted in needs:
        if wanted and run is None:
            with _blamed_on(option):
                run = RunData(source.path, cfg.data_cache)
    if cfg.calibration_data is not None:
        with _blamed_on("--calibration-data"):
            check_calibration_source(cfg.calibration_data, run)
    return source, run


def _check_groups(cfg: ExpandConfig, source: CheckpointReader) -> None:
    """Routing groups live in the run record, and a grouped model's groups must cover its new experts."""
    record = source.meta.run_record
    if cfg.distinct_copies and record is None:
        raise UserError("--distinct-copies records the copies' groups in the model config of the source's "
                        "ds_upcycle.json, which this checkpoint lacks (not written by train.py)")
    grows = any(cfg.target_experts_of(layer.index, layer.num_experts) > layer.num_experts
                for layer in source.moe_layers)
    if record is not None and record.model.route_groups is not None and grows and not cfg.distinct_copies:
        raise UserError(f"{source.path} routes its experts in groups (an expansion with --distinct-copies): "
                        f"expand it with --distinct-copies again, or lift the groups first "
                        f"(train.py --set route_groups=none)")


def target_layout(cfg: ExpandConfig, source: CheckpointReader) -> tuple[int, int]:
    """(world_size, ep_size) of the output; every layer's target expert count must fit it."""
    layouts = [cfg.target_layout(source.world_size, source.ep_size, cfg.target_experts_of(layer.index, layer.num_experts))
               for layer in source.moe_layers]
    return layouts[0]  # the same for every layer; building each checked that layer's expert count


def plan_expansion(cfg: ExpandConfig, source: CheckpointReader, run: RunData | None) -> ExpansionPlan:
    world, ep = target_layout(cfg, source)
    measured = measured_scores(cfg, source, run)
    splits, split_info = {}, None
    if cfg.split_copies:
        with _blamed_on("--split-copies"):
            splits, split_info = measure_splits(cfg, source, run)
    layers = {index: LayerExpansion(plan, route_bias_scale(plan, score_func(source, source.moe_layers[index])),
                                    router_noise_target(source, source.moe_layers[index], cfg.router_noise),
                                    splits.get(index))
              for index, plan in make_plans(source, cfg, ep, measured).items()}
    return ExpansionPlan(source, run, Path(source.path).name, world, ep, layers, score_origin(cfg, measured),
                         split_info)


def score_func(source: CheckpointSource, layer: MoELayer) -> str | None:
    """How the layer's router scores experts (softmax, sigmoid), where the checkpoint says."""
    record = source.meta.run_record
    if record is not None:
        return record.model.score_func
    return autoep_score_func(source.meta.ds_config) if layer.autoep else None


def manifest(cfg: ExpandConfig, plan: ExpansionPlan) -> dict:
    """What was expanded from what, how, and for which layout (checksums and timing are added on writing)."""
    source = plan.source
    return {
        "ds_upcycle_version": __version__, "torch_version": torch.__version__,
        "deepspeed_version": deepspeed.__version__, "python": platform.python_version(),
        "source": {"path": str(Path(source.path).resolve()), "tag": plan.tag, "world_size": source.world_size,
                   "ep_size": source.ep_size, "global_steps": source.meta.global_steps},
        "target": {"world_size": plan.world_size, "ep_size": plan.ep_size},
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("source", "destination", "data_cache")},
        "layers": [_layer_record(plan, layer) for layer in source.moe_layers],
        "scores": plan.scores,
        **({"split_copies": plan.split_info} if plan.split_info else {}),
    }


def _layer_record(plan: ExpansionPlan, layer: MoELayer) -> dict:
    expansion = plan.layers[layer.index]
    record = {"index": layer.index, "prefix": layer.prefix, **expansion.to_dict(),
              "rank_loads": expansion.plan.rank_loads(plan.ep_size)}
    return record


def write_expansion(cfg: ExpandConfig, plan: ExpansionPlan, record: dict, started: float, progress: bool) -> dict:
    """Write the expanded checkpoint and its manifest to cfg.destination atomically; returns the
    manifest as written (`record` plus the seconds since `started` and the files' checksums)."""
    expanded = ExpandedSource(plan, cfg)
    to_write = ProgressSource(expanded) if progress else expanded
    written = {}

    def add_manifest(tag_dir: Path) -> None:
        written.update(record, seconds=round(time.perf_counter() - started, 3), checksums=_checksums(tag_dir))
        write_json_atomic(tag_dir / MANIFEST, written)

    write_checkpoint(to_write, cfg.destination, plan.tag, plan.world_size, plan.ep_size, replace=cfg.force,
                     finish=add_manifest)
    return written


def check_warm_start(cfg: ExpandConfig, plan: ExpansionPlan) -> WarmStart:
    """Validation loss of source and output, recorded in the manifest (a failure here leaves a
    complete expansion behind)."""
    result = warm_start(plan.run, cfg.destination, cfg.check_samples)
    path = Path(cfg.destination) / plan.tag / MANIFEST
    write_json_atomic(path, {**json.loads(path.read_text()), "warm_start": result.to_dict()})
    return result


def expand_checkpoint(cfg: ExpandConfig, dry_run: bool = False, progress: bool = True) -> ExpandResult:
    """Expand (or, with multiplier 1, reshard) cfg.source into cfg.destination."""
    started = time.perf_counter()
    check_destination(Path(cfg.destination), cfg.force)
    source, run = open_source(cfg)
    plan = plan_expansion(cfg, source, run)
    record = manifest(cfg, plan)
    plans = {index: layer.plan for index, layer in plan.layers.items()}
    if dry_run:
        return ExpandResult(Path(cfg.destination), plan.tag, plans, record)
    if cfg.check_data:
        plan.run.split("val")  # prepared before writing: a data problem then costs no output
    written = write_expansion(cfg, plan, record, started, progress)
    if not cfg.check_data:
        return ExpandResult(Path(cfg.destination), plan.tag, plans, written)
    check = check_warm_start(cfg, plan)
    return ExpandResult(Path(cfg.destination), plan.tag, plans, {**written, "warm_start": check.to_dict()}, check)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(tag_dir: Path) -> dict[str, str]:
    files = [p for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MANIFEST]
    # hashlib releases the GIL on large blocks, so files hash in parallel on all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip((p.name for p in files), pool.map(_sha256, files)))
