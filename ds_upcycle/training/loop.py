"""The training run: DeepSpeed engine setup, the step loop, validation and checkpoints."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__, comm
from ..config import ModelConfig, parse_overrides, resolve_model_config
from ..data import BatchOrder, DataConfig, PackedSequences, prepare_data, validation_batches
from ..errors import UserError
from ..model import Transformer
from ..moe.balance import balance_routers
from .checkpoint import CheckpointRef, find_checkpoint, latest_checkpoint, write_run_files
from .config import TrainConfig
from .metrics import MetricsLog
from .schedule import WSDSchedule


@dataclass
class Position:
    """Where a run stands in its data; saved in the checkpoint's client state."""

    split: str
    samples: int = 0          # samples of `split` consumed
    tokens: int = 0           # tokens trained on, all stages together


@dataclass
class RunResult:
    step: int
    val_loss: float
    tokens: int
    history: list[dict] = field(default_factory=list)


def read_ds_config(path: str | os.PathLike, micro_batch: int | None, grad_accum: int | None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if "scheduler" in config:
        raise UserError(f"{path}: remove the 'scheduler' section; train.py applies its own "
                        f"warmup-stable-decay schedule (see --warmup-steps, --decay-fraction)")
    if micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch
        config.pop("train_batch_size", None)
    if grad_accum is not None:
        config["gradient_accumulation_steps"] = grad_accum
        config.pop("train_batch_size", None)
    return config


def _single_process_env() -> None:
    """Let `python train.py` run without a launcher, as one process."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _start_checkpoint(cfg: TrainConfig) -> tuple[CheckpointRef | None, bool]:
    """(checkpoint to start from, whether it resumes this save_dir's own run)."""
    own = latest_checkpoint(cfg.save_dir)
    if own is not None:
        return own, True
    return (find_checkpoint(cfg.load_dir) if cfg.load_dir else None), False


def _model_config(preset: str | None, overrides: list[str], start: CheckpointRef | None) -> ModelConfig:
    if start is None:
        return resolve_model_config(preset or "tiny", overrides)
    if preset is not None and comm.rank() == 0:
        print(f"note: --model {preset} ignored: the model comes from checkpoint {start.path}")
    return start.model_config.replace(**parse_overrides(overrides))


def _prepare(data_cfg: DataConfig, tokenizer: Path | None):
    # Rank 0 tokenizes; the others then find the result in the cache.
    if comm.rank() == 0:
        prepared = prepare_data(data_cfg, tokenizer)
    comm.barrier()
    if comm.rank() != 0:
        prepared = prepare_data(data_cfg, tokenizer)
    return prepared


@torch.no_grad()
def evaluate(engine, data: PackedSequences, num_samples: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over the first num_samples validation sequences."""
    world = comm.world_size()
    num_samples = max(world, num_samples - num_samples % world)  # equal work on every rank (all-to-all)
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs_BT, targets_BT in validation_batches(data, num_samples, batch_size, world, comm.rank()):
        logits_BTV, _ = engine(inputs_BT.to(engine.device))
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.to(engine.device).flatten(),
                               reduction="sum")
        totals += torch.tensor([loss.item(), targets_BT.numel()], dtype=torch.float64)
    engine.train()
    totals = comm.sum_over_world(totals.to(engine.device)).cpu()
    return (totals[0] / totals[1]).item()


def _train_step(engine, model: Transformer, order: BatchOrder, position: int) -> float:
    loss_sum = 0.0
    for inputs_BT, targets_BT in order.micro_batches(position):
        logits_BTV, aux_loss = engine(inputs_BT.to(engine.device))
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.to(engine.device).flatten())
        engine.backward(loss + aux_loss)
        engine.step()
        loss_sum += loss.item()
    mean = torch.tensor([loss_sum / order.grad_accum], dtype=torch.float64, device=engine.device)
    return (comm.sum_over_world(mean) / comm.world_size()).item()


def run_training(train_cfg: TrainConfig, data_cfg: DataConfig, ds_config: dict,
                 preset: str | None = None, overrides: list[str] | None = None) -> RunResult:
    import deepspeed
    from tqdm import tqdm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % train_cfg.ep_size:
        raise UserError(f"world size {world} is not divisible by --ep-size {train_cfg.ep_size}")
    start, resuming = _start_checkpoint(train_cfg)
    model_cfg = _model_config(preset, overrides or [], start)
    if model_cfg.num_experts % train_cfg.ep_size:
        raise UserError(f"num_experts {model_cfg.num_experts} is not divisible by --ep-size {train_cfg.ep_size}")

    _single_process_env()
    deepspeed.init_distributed()
    rank, is_main = comm.rank(), comm.rank() == 0
    prepared = _prepare(data_cfg, start.tokenizer if start else None)
    vocab = prepared.meta["vocab_size"]
    if start is not None and model_cfg.vocab_size != vocab:
        raise UserError(f"checkpoint vocab_size {model_cfg.vocab_size} does not match its tokenizer ({vocab})")
    model_cfg = model_cfg.replace(vocab_size=vocab)
    model = Transformer(model_cfg, ep_size=train_cfg.ep_size, ep_rank=rank % train_cfg.ep_size, seed=train_cfg.seed)

    schedule_fn = partial(WSDSchedule, total=train_cfg.steps, warmup=train_cfg.warmup,
                          decay_fraction=train_cfg.decay_fraction, min_ratio=train_cfg.min_lr_ratio)
    engine, _, _, schedule = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                  config=ds_config, lr_scheduler=schedule_fn)
    position = Position(train_cfg.split)
    if start is not None:
        config_peaks = list(schedule.peak_lrs)
        try:
            load_path, client = engine.load_checkpoint(str(start.save_dir), tag=start.tag)
        except Exception as err:  # DeepSpeed raises assorted types for layout mismatches
            raise UserError(f"cannot load {start.path} on this layout (world size {world}, "
                            f"ep_size {train_cfg.ep_size}): {str(err).splitlines()[0]}") from None
        if load_path is None:
            raise UserError(f"DeepSpeed found no checkpoint in {start.path}")
        saved = Position(**client.get("ds_upcycle", {}).get("position", {"split": train_cfg.split}))
        new_stage = train_cfg.fresh_schedule and not resuming
        same_data = saved.split == train_cfg.split and not new_stage
        position = Position(train_cfg.split, saved.samples if same_data else 0, saved.tokens)
        if new_stage:
            schedule.start_stage(train_cfg.steps, train_cfg.warmup, config_peaks)
        else:
            schedule.total = train_cfg.steps
    stage_end = schedule.stage_start + train_cfg.steps

    train_data = PackedSequences(prepared.tokens(train_cfg.split), data_cfg.seq_len, train_cfg.split)
    val_data = PackedSequences(prepared.tokens("val"), data_cfg.seq_len, "val")
    order = BatchOrder(train_data, engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                       world, rank, seed=train_cfg.seed)
    metrics = MetricsLog(Path(train_cfg.save_dir) / "metrics.jsonl" if train_cfg.save_dir and is_main else None)
    if resuming:
        metrics.truncate_after(engine.global_steps)

    def save(step: int) -> None:
        if not train_cfg.save_dir:
            return
        tag = f"global_step{step}"
        if is_main:
            write_run_files(Path(train_cfg.save_dir) / tag, model_cfg, prepared.tokenizer_path, {
                "global_step": step, "tokens_seen": position.tokens, "split": position.split,
                "data": {k: v for k, v in asdict(data_cfg).items() if k != "cache_dir"},
                "ds_upcycle_version": __version__})
        engine.save_checkpoint(train_cfg.save_dir, tag=tag, client_state={"ds_upcycle": {"position": asdict(position)}})

    bar = tqdm(total=train_cfg.steps, initial=engine.global_steps - schedule.stage_start,
               disable=not is_main, desc=f"train ({train_cfg.split})", unit="step", dynamic_ncols=True)
    tokens_per_step = order.global_batch * data_cfg.seq_len
    history, val_loss = [], float("nan")
    while engine.global_steps < stage_end:
        started, lr = time.perf_counter(), schedule.get_lr()[0]
        loss = _train_step(engine, model, order, position.samples)
        position.samples += order.global_batch
        position.tokens += tokens_per_step
        load = balance_routers(model.routers, model_cfg.route_bias_update, comm.sum_over_world)
        step_time = time.perf_counter() - started
        step = engine.global_steps
        record = {"step": step, "tokens": position.tokens, "loss": loss, "lr": lr,
                  "step_time": step_time, "tokens_per_s": tokens_per_step / step_time,
                  "load": [{"layer": layer, **stats} for layer, stats in zip(model_cfg.moe_layer_ids, load)]}
        last = step >= stage_end
        if last or (train_cfg.eval_interval and step % train_cfg.eval_interval == 0):
            val_loss = evaluate(engine, val_data, train_cfg.eval_samples, order.micro_batch)
            record["val_loss"] = val_loss
            if is_main:
                bar.write(f"step {step}: val_loss {val_loss:.4f}")
        metrics.write(record)
        history.append(record)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)
        if last or (train_cfg.save_interval and step % train_cfg.save_interval == 0):
            save(step)
    bar.close()
    if not history:  # the stage was already complete
        val_loss = evaluate(engine, val_data, train_cfg.eval_samples, order.micro_batch)
    return RunResult(engine.global_steps, val_loss, position.tokens, history)
