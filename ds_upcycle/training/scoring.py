"""`train.py --score-experts`: the experts' utility scores, measured on the training engine.

Calibration on a real model belongs where its gradients are: on the GPUs and the layout it trains
on. The checkpoint is loaded into a DeepSpeed engine built from the training config (any world
size, ep_size, ZeRO stage, precision); every process takes its share of each calibration batch (the
first windows of the data, in order, as `expand --calibration-data` reads them) in micro-batches of
the config's size, and the gradient of each expert is averaged over all processes
(comm.mean_over_world). The statistics are trained.gradients', so one CPU process and any job agree
on the same batches. Gradients are taken with torch.autograd.grad on the engine's module: no
optimizer step, no gradient buffer of the engine touched.

Each process scores the experts it holds; the first expert-parallel group (ranks 0 .. ep_size - 1,
which together hold every expert once) contributes them to one table summed over the world, and
rank 0 writes the file (trained.scores.ExpertScores) that `ds-upcycle expand --scores` reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import deepspeed
import torch

from .. import comm
from ..checkpoint import check_checkpoint_dir, find_checkpoint
from ..config import check_expert_parallel
from ..errors import UserError
from ..model import Transformer
from ..moe.autoep import prepare_balancing
from ..moe.live import live_moe_layers
from ..moe.names import moe_prefix
from ..trained import RunData
from ..trained.calibration_data import SOURCE_DATA, calibration_data, check_calibration_source
from ..trained.gradients import expert_gradient_stats
from ..trained.scores import GRADIENT_RULES, ExpertScores, GradientStats, expert_score, scored_checkpoint
from .loop import engine_config


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring pass.

    Attributes:
        load_dir: the checkpoint to score (save dir with `latest`, or a tag dir).
        output: the scores file to write (JSON; replaced atomically).
        batches: calibration batches, each of the DeepSpeed config's global batch size
            (micro-batch x gradient accumulation x world size) sequences.
        data: "source" (the cpt split of the checkpoint's training data) or a data source as
            train.py takes it, tokenized with the checkpoint's tokenizer.
        ep_size: expert-parallel size of the job.
        data_cache: where the tokenized data is found or prepared.
    """

    load_dir: str
    output: str
    batches: int = 8
    data: str = SOURCE_DATA
    ep_size: int = 1
    data_cache: str | None = None

    def __post_init__(self) -> None:
        if self.batches < 1:
            raise UserError(f"--score-batches must be >= 1, got {self.batches}")
        if self.ep_size < 1:
            raise UserError(f"--ep-size must be >= 1, got {self.ep_size}")
        if not self.data.strip():
            raise UserError("--score-data is empty; give 'source' or a data source")


def run_scoring(cfg: ScoreConfig, ds_config: dict) -> ExpertScores:
    """Score every expert of cfg.load_dir on this job's layout and write cfg.output (rank 0)."""
    start = find_checkpoint(cfg.load_dir)
    model_cfg = start.model_config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_expert_parallel(cfg.ep_size, model_cfg.experts_per_layer, world, "--ep-size")
    if not model_cfg.moe_layer_ids:
        raise UserError(f"{start.path} has no MoE layers to score")
    ds_config = engine_config(ds_config, model_cfg, cfg.ep_size)  # its refusals before any work
    try:
        run = RunData(start, cfg.data_cache)
        check_calibration_source(cfg.data, run)
    except UserError as err:
        raise UserError(f"--score-data: {err}") from None

    comm.single_process_env()
    comm.init_distributed()
    started = time.perf_counter()
    model = Transformer(model_cfg, ep_size=cfg.ep_size, ep_rank=comm.rank() % cfg.ep_size)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    prepare_balancing(model)  # AutoEP's layers: the selection bias the checkpoint holds needs its buffer
    check_checkpoint_dir(start.path)  # DeepSpeed unpickles the files in full: refuse unknown classes first
    loaded, _ = engine.load_checkpoint(str(start.save_dir), tag=start.tag, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
    if loaded is None:
        raise UserError(f"DeepSpeed found no checkpoint in {start.path}")
    batch, micro = engine.train_batch_size(), engine.train_micro_batch_size_per_gpu()
    def windows():
        return calibration_data(run, cfg.data, cfg.batches * batch)

    try:
        # The source's split is prepared and cached by rank 0 first; other data each rank reads alone.
        data = comm.rank_zero_first(windows) if cfg.data == SOURCE_DATA else windows()
    except UserError as err:
        raise UserError(f"--score-data: {err}") from None
    shares = data.shares(batch, comm.rank(), comm.world_size(), micro)
    if len(shares) < cfg.batches:
        raise UserError(f"--score-data {cfg.data!r} has {len(data.windows)} sequences of {run.seq_len + 1} tokens, "
                        f"fewer than {cfg.batches} batches of {batch}; lower --score-batches")

    replicas = comm.expert_replicas(live_moe_layers(model)[0].ep_group_name)
    stats = expert_gradient_stats(engine.module, shares, lambda grad: comm.mean_over_world(grad, replicas))
    layers = _gather_scores(model, stats, cfg.ep_size, engine.device)
    info = {"from": "scoring pass", "data": cfg.data, "description": data.description, "batches": len(shares),
            "batch_size": batch, "sequences": len(shares) * batch, "seq_len": run.seq_len,
            "world_size": comm.world_size(), "ep_size": cfg.ep_size,
            "precision": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - started, 3)}
    scores = ExpertScores(layers, scored_checkpoint(start.tag, start.run_record.global_step), info)
    if comm.rank() == 0:
        scores.write(cfg.output)
    comm.barrier()
    return scores


def _gather_scores(model: Transformer, stats: dict[str, dict[int, GradientStats]], ep_size: int,
                   device) -> dict[str, dict[str, list[float]]]:
    """Every expert's score by every rule, on every rank: each expert from the one rank of the first
    expert-parallel group that holds it."""
    prefixes = [moe_prefix(layer) for layer in model.cfg.moe_layer_ids]
    sizes = model.cfg.experts_per_layer
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    table = torch.zeros(sum(sizes), len(GRADIENT_RULES), dtype=torch.float64, device=device)
    if comm.rank() < ep_size:
        for prefix, offset in zip(prefixes, offsets):
            for expert, entry in stats.get(prefix, {}).items():
                table[offset + expert] = torch.tensor([expert_score(rule, entry) for rule in GRADIENT_RULES],
                                                      dtype=torch.float64)
    comm.sum_over_world(table)
    table = table.cpu()
    return {prefix: {rule: table[offset:offset + size, r].tolist() for r, rule in enumerate(GRADIENT_RULES)}
            for prefix, offset, size in zip(prefixes, offsets, sizes)}
