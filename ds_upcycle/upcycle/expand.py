"""`ds-upcycle expand`: read a checkpoint, apply the operator layer by layer, write it for a layout.

The checkpoint package knows DeepSpeed's files; the operator knows the method; this module joins
them: `ExpandedSource` presents the expanded model as a checkpoint source that the writer consumes
one expert at a time, so no more than the source's lazily read tensors are held at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import CheckpointSource, NonExpertState, ParamState, read_checkpoint, write_checkpoint
from ..checkpoint.files import write_text_atomic
from ..checkpoint.state import MoELayer
from ..errors import UserError
from .calibration import Calibration, calibrate, check_calibration_source
from .config import ExpandConfig
from .operator import LayerPlan, expand_router_bias, expand_rows, moment_factor, plan_layer
from .scores import GradientStats, expert_score
from .warmstart import source_data_config, validation_data, warm_start

MANIFEST = "upcycle_manifest.json"
ROUTER_WEIGHT = ".deepspeed_moe.gate.wg.weight"
ROUTER_BIAS = ".deepspeed_moe.gate.route_bias"


def layer_scores(source: CheckpointSource, layer: MoELayer, rule: str,
                 calibration: Calibration | None = None) -> list[float] | None:
    """Utility of each expert: from calibration gradients if given, else from the checkpoint's Adam
    state (no data needed)."""
    if rule == "uniform":
        return None
    if calibration is not None:
        stats = calibration.layer_stats(layer.prefix)
        if len(stats) != layer.num_experts:
            raise UserError(f"calibration found {len(stats)} experts in {layer.prefix}, the checkpoint "
                            f"{layer.num_experts}")
        return [expert_score(rule, s) for s in stats]
    if source.meta.optimizer_step is None:
        raise UserError(f"--select {rule} reads the checkpoint's Adam state, but it has none "
                        f"(saved before the first step?); use --select uniform")
    scores = []
    for expert in range(layer.num_experts):
        params = source.expert_state(layer.index, expert)
        stats = GradientStats.from_adam({k: p.fp32 for k, p in params.items()},
                                        {k: p.exp_avg for k, p in params.items()},
                                        {k: p.exp_avg_sq for k, p in params.items()})
        scores.append(expert_score(rule, stats))
    return scores


def make_plans(source: CheckpointSource, cfg: ExpandConfig, ep_size: int,
               calibration: Calibration | None = None) -> dict[int, LayerPlan]:
    plans = {}
    for layer in source.moe_layers:
        target = cfg.target_experts_of(layer.index, layer.num_experts)
        # A layer that keeps its experts needs no scores: there is nothing to allocate.
        rule = cfg.select if target > layer.num_experts else "uniform"
        plans[layer.index] = plan_layer(layer.num_experts, target, layer_scores(source, layer, rule, calibration),
                                        cfg.max_copies, ep_size)
    return plans


def score_origin(cfg: ExpandConfig, calibration: Calibration | None) -> dict:
    """Where the utility scores came from, for the manifest."""
    if cfg.select == "uniform":
        return {"from": "none (uniform)"}
    return dict(calibration.info) if calibration is not None else {"from": "adam state"}


def _expand_param(state: ParamState, plan: LayerPlan, mode: str) -> ParamState:
    """A per-expert-row parameter (router weight) for the new experts."""
    moments = [None if t is None else expand_rows(t, plan, moment, mode)
               for moment, t in ((1, state.exp_avg), (2, state.exp_avg_sq))]
    return ParamState(expand_rows(state.fp32, plan), *moments)


def with_route_groups(run_info: dict | None, layers: list[MoELayer], plans: dict[int, LayerPlan]) -> dict:
    """The model config with every new expert grouped with the other copies of its source expert.

    An expert of an already grouped source keeps its group, so expanding twice groups all copies
    of one original expert together.
    """
    if not run_info or "model" not in run_info:
        raise UserError("--distinct-copies records the copies' groups in the model config of the source's "
                        "ds_upcycle.json, which this checkpoint lacks (not written by train.py)")
    old = run_info["model"].get("route_groups")
    groups = []
    for position, layer in enumerate(layers):
        before = old[position] if old else list(range(layer.num_experts))
        groups.append([before[source] for source in plans[layer.index].sources])
    return {**run_info, "model": {**run_info["model"], "route_groups": groups}}


class ExpandedSource:
    """The expanded checkpoint, computed on demand from the source (implements CheckpointSource)."""

    def __init__(self, source: CheckpointSource, plans: dict[int, LayerPlan], cfg: ExpandConfig) -> None:
        self.source, self.plans, self.cfg = source, plans, cfg
        self.meta = source.meta
        if cfg.distinct_copies:
            self.meta = replace(source.meta, run_info=with_route_groups(source.meta.run_info, source.moe_layers, plans))
        self.moe_layers = [layer.with_experts(plans[layer.index].num_target) for layer in source.moe_layers]
        self.router_noise_target: dict[int, str] = {}

    def non_expert_state(self) -> NonExpertState:
        state = self.source.non_expert_state()
        params, buffers = dict(state.params), dict(state.buffers)
        # One generator walked in layer order: the same seed gives the same noise.
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for layer in self.source.moe_layers:
            plan = self.plans[layer.index]
            weight_name, bias_name = layer.prefix + ROUTER_WEIGHT, layer.prefix + ROUTER_BIAS
            if weight_name not in params:
                raise UserError(f"{layer.prefix}: no router weight {weight_name} in the checkpoint")
            params[weight_name] = _expand_param(params[weight_name], plan, self.cfg.optimizer_state)
            if bias_name in buffers:
                buffers[bias_name] = expand_router_bias(buffers[bias_name], plan, self.cfg.router_noise, gen)
                self.router_noise_target[layer.index] = "routing bias"
            elif self.cfg.router_noise > 0:
                # DeepSpeed's stock gate has no routing bias: the noise goes on the replicas' router
                # rows instead, which breaks the ties token by token rather than expert by expert.
                weight = params[weight_name]
                noise = torch.randn(weight.fp32.shape, generator=gen, dtype=torch.float64) * self.cfg.router_noise
                noise[~plan.replicas] = 0
                weight.fp32 = weight.fp32 + noise.to(weight.fp32.dtype)
                self.router_noise_target[layer.index] = "router weight rows (no routing bias)"
        return NonExpertState(params, buffers)

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        plan = self.plans[layer]
        params = self.source.expert_state(layer, plan.sources[expert])
        # The reader assembles new tensors on every call, so they can be handed on without copying.
        out = {}
        for suffix, state in params.items():
            moments = []
            for moment, tensor in ((1, state.exp_avg), (2, state.exp_avg_sq)):
                factor = moment_factor(plan, expert, moment, self.cfg.optimizer_state)
                moments.append(tensor if tensor is None or factor == 1.0 else tensor * factor)
            out[suffix] = ParamState(state.fp32, *moments)
        return out


@dataclass
class ExpandResult:
    destination: Path
    tag: str
    plans: dict[int, LayerPlan]
    manifest: dict


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


def _prepare_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise UserError(f"destination {dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise UserError(f"destination {dst} is not empty; pass --force to replace it")


def expand_checkpoint(cfg: ExpandConfig, dry_run: bool = False, progress: bool = True) -> ExpandResult:
    """Expand (or, with multiplier 1, reshard) cfg.source into cfg.destination."""
    from tqdm import tqdm

    started = time.perf_counter()
    source = read_checkpoint(cfg.source)
    src_dir, dst = Path(source.path), Path(cfg.destination)
    if src_dir.resolve().is_relative_to(dst.resolve()):
        raise UserError(f"destination {dst} would overwrite the source checkpoint {src_dir}")
    if not source.moe_layers:
        raise UserError(f"{src_dir} has no MoE layers to expand")
    if cfg.check_data:  # fail before writing anything if the source cannot be checked
        try:
            source_data_config(src_dir, cfg.data_cache)
        except UserError as err:
            raise UserError(f"--check-data: {err}") from None
    if cfg.calibration_data is not None:  # likewise for calibration: the data must be there
        try:
            check_calibration_source(src_dir, cfg.calibration_data, cfg.data_cache)
        except UserError as err:
            raise UserError(f"--calibration-data: {err}") from None
    _prepare_destination(dst, cfg.force)
    cfg.check_layers(len(source.moe_layers))
    for layer in source.moe_layers:
        world, ep = cfg.target_layout(source.world_size, source.ep_size,
                                      cfg.target_experts_of(layer.index, layer.num_experts))
    calibration = None
    if cfg.calibration_data is not None:
        try:
            calibration = calibrate(src_dir, source, cfg.calibration_data, cfg.calibration_batches,
                                    cfg.calibration_batch_size, cfg.data_cache)
        except UserError as err:
            raise UserError(f"--calibration-data: {err}") from None
    plans = make_plans(source, cfg, ep, calibration)
    tag = src_dir.name
    manifest = {
        "ds_upcycle_version": __version__, "torch_version": torch.__version__,
        "deepspeed_version": _deepspeed_version(), "python": platform.python_version(),
        "source": {"path": str(src_dir.resolve()), "tag": tag, "world_size": source.world_size,
                   "ep_size": source.ep_size, "global_steps": source.meta.global_steps},
        "target": {"world_size": world, "ep_size": ep},
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("source", "destination", "data_cache")},
        "layers": [{"index": layer.index, "prefix": layer.prefix, **plans[layer.index].to_dict(),
                    "rank_loads": plans[layer.index].rank_loads(ep)} for layer in source.moe_layers],
    }
    manifest["scores"] = score_origin(cfg, calibration)
    if dry_run:
        return ExpandResult(dst, tag, plans, manifest)

    val_data = validation_data(src_dir, cfg.data_cache) if cfg.check_data else None
    expanded = ExpandedSource(source, plans, cfg)
    to_write = ProgressSource(expanded, tqdm) if progress else expanded
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        out_dir = staging / "out"
        write_checkpoint(to_write, out_dir, tag, world, ep)
        for entry in manifest["layers"]:
            entry["router_noise_on"] = expanded.router_noise_target.get(entry["index"], "none")
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        manifest["checksums"] = _checksums(out_dir / tag)
        (out_dir / tag / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_into_place(out_dir, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if cfg.check_data:
        # Measured on the output in place (a failure here leaves a complete expansion behind).
        result = warm_start(src_dir, dst, cfg.check_samples, cfg.data_cache, data=val_data)
        manifest["warm_start"] = result.to_dict()
        write_text_atomic(dst / tag / MANIFEST, json.dumps(manifest, indent=2))
    return ExpandResult(dst, tag, plans, manifest)


def _swap_into_place(new: Path, dst: Path) -> None:
    """Rename the finished output to dst; an existing dst (only with --force) goes only after that."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        new.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
    dst.rename(old)
    new.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


class ProgressSource:
    """Wraps a source so that the writer's walk over experts shows one progress bar per layer."""

    def __init__(self, inner: ExpandedSource, tqdm) -> None:
        self.inner, self.meta, self.moe_layers = inner, inner.meta, inner.moe_layers
        self._tqdm = tqdm
        self._bars: dict[int, object] = {}
        self._seen: dict[int, set[int]] = {}

    def non_expert_state(self) -> NonExpertState:
        return self.inner.non_expert_state()

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        bar = self._bars.get(layer)
        if bar is None:
            total = self.moe_layers[layer].num_experts
            bar = self._bars[layer] = self._tqdm(total=total, desc=f"MoE layer {layer}", unit="expert",
                                                 leave=False, dynamic_ncols=True)
        state = self.inner.expert_state(layer, expert)
        seen = self._seen.setdefault(layer, set())
        if expert not in seen:  # the writer may ask twice for an expert split over two partitions
            seen.add(expert)
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()
        return state
