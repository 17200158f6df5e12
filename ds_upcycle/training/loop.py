"""The training run: DeepSpeed engine setup, the step loop, validation and checkpoints."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import comm
from ..atomic import check_writable
from ..checkpoint import (CheckpointRef, ImportOrigin, MetricsLog, RunRecord, check_checkpoint_dir, find_checkpoint,
                          latest_checkpoint, read_checkpoint, write_run_files)
from ..config import ModelConfig, check_expert_parallel, parse_overrides, resolve_model_config
from ..data.config import DataConfig
from ..data.loader import BatchOrder, PackedSequences
from ..data.prepare import PreparedData, prepare_data
from ..data.sources import resolve_source
from ..data.tokenizer import tokenizer_digest
from ..errors import UserError
from ..model import Transformer
from ..moe.autoep import prepare_balancing
from ..moe.live import LiveMoE, balance_layers, live_moe_layers, set_routing_groups
from ..moe.stacked import autoep_section
from ..trained import validation_loss
from ..trained.copies import copy_diagnostics, counting
from .config import TrainConfig
from .continuation import (check_model_overrides, hyperparameters, note, reapply_hyperparameters, run_changes,
                           schedule_changes)
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


def _start_checkpoint(cfg: TrainConfig) -> tuple[CheckpointRef | None, bool]:
    """(checkpoint to start from, whether it resumes this save_dir's own run)."""
    own = latest_checkpoint(cfg.save_dir)
    if own is not None:
        if cfg.load_dir:
            ignored = "--load and --fresh-schedule apply" if cfg.fresh_schedule else "--load applies"
            note(f"resuming {own.path}; {ignored} only while --save holds no checkpoint")
        return own, True
    return (find_checkpoint(cfg.load_dir) if cfg.load_dir else None), False


def _model_config(preset: str | None, overrides: list[str], start: CheckpointRef | None) -> ModelConfig:
    if start is None:
        return resolve_model_config(preset or "tiny", overrides)
    if preset is not None:
        note(f"--model {preset} ignored: the model comes from checkpoint {start.path}")
    changes = parse_overrides(overrides)
    check_model_overrides(start.model_config, changes, start.path)
    return start.model_config.replace(**changes)


def _check_tokenizer(data_cfg: DataConfig, vocab_size: int | None, start: CheckpointRef) -> None:
    """A model keeps the tokenizer its token ids mean: the checkpoint's, never another."""
    if start.tokenizer is None:
        return
    if data_cfg.tokenizer and tokenizer_digest(data_cfg.tokenizer) != tokenizer_digest(start.tokenizer):
        raise UserError(f"--tokenizer {data_cfg.tokenizer} is not the tokenizer of checkpoint {start.path}, "
                        f"whose token ids the model was trained on; drop --tokenizer")
    data = start.run_record.data
    if vocab_size is not None and vocab_size != (data.vocab_size if data is not None else None):
        note(f"--vocab-size {vocab_size} ignored: the model keeps the tokenizer of checkpoint {start.path}")


def _check_layout(start: CheckpointRef, world: int, ep_size: int) -> None:
    """Optimizer state resumes only on the layout that saved it: refused, with the way to reshard,
    rather than left to DeepSpeed (which fails deep inside loading, or worse, loads it onto the
    wrong experts)."""
    if not start.has_optimizer_state:
        return  # module weights only: they fit any layout
    saved = read_checkpoint(start.path)
    if (saved.world_size, saved.ep_size) != (world, ep_size):
        raise UserError(f"{start.path} was saved on world size {saved.world_size} with ep_size {saved.ep_size}, and "
                        f"its optimizer state resumes only there (this job: world size {world}, ep_size {ep_size}); "
                        f"reshard it first: ds-upcycle expand {start.path} NEW -m 1 --world-size {world} "
                        f"--ep-size {ep_size}, then train.py --load NEW")


def engine_config(ds_config: dict, model_cfg: ModelConfig, ep_size: int) -> dict:
    """The DeepSpeed config with AutoEP set to replace the model's stacked MoE blocks (moe_dispatch=autoep);
    other settings of a user's `expert_parallel` section (kernels, combine) stay."""
    user = ds_config.get("expert_parallel") or {}
    if model_cfg.moe_dispatch != "autoep":
        if user.get("enabled"):
            raise UserError("the DeepSpeed config enables expert_parallel (AutoEP), which replaces stacked MoE "
                            "blocks: train with --set moe_dispatch=autoep, or drop the section")
        return ds_config
    if user.get("preset_model"):
        raise UserError(f"expert_parallel.preset_model {user['preset_model']!r}: train.py names its own MoE blocks "
                        f"to AutoEP; drop preset_model")
    section = autoep_section(model_cfg.top_k, model_cfg.score_func, model_cfg.normalize_routes, ep_size)
    return {**ds_config, "expert_parallel": {**user, **section}}


def _prepare(data_cfg: DataConfig, tokenizer: Path | None):
    # Rank 0 tokenizes; the others then find the result in the cache.
    return comm.rank_zero_first(lambda: prepare_data(data_cfg, tokenizer))


def _train_step(engine, order: BatchOrder, position: int) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean loss over all ranks."""
    loss_sum = 0.0
    for inputs_BT, targets_BT in order.micro_batches(position):
        logits_BTV, aux_loss = engine(inputs_BT.to(engine.device))
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.to(engine.device).flatten())
        engine.backward(loss + aux_loss)
        engine.step()
        loss_sum += loss.item()
    mean = torch.tensor([loss_sum / order.grad_accum], dtype=torch.float64, device=engine.device)
    return (comm.sum_over_world(mean) / comm.world_size()).item()


def _stage_settings(cfg: TrainConfig, peak_lrs: list[float]) -> dict:
    return {"total": cfg.steps, "warmup": cfg.warmup, "decay_fraction": cfg.decay_fraction,
            "min_ratio": cfg.min_lr_ratio, "peak_lrs": list(peak_lrs)}


def _run_settings(cfg: TrainConfig, data_cfg: DataConfig, global_batch: int) -> dict:
    """What a resumed run compares with its record (RunRecord.run)."""
    return {"seed": cfg.seed, "global_batch": global_batch, "source": data_cfg.source,
            "seq_len": data_cfg.seq_len, "val_fraction": data_cfg.val_fraction,
            "cpt_fraction": data_cfg.cpt_fraction, "text_field": data_cfg.text_field}


RUN_FLAGS = {"seed": "--seed", "global_batch": "global batch size", "source": "--data", "seq_len": "--seq-len",
             "val_fraction": "--val-fraction", "cpt_fraction": "--cpt-fraction", "text_field": "--text-field"}


def _restore(engine, schedule: WSDSchedule, start: CheckpointRef, resuming: bool, cfg: TrainConfig,
             data_cfg: DataConfig) -> Position:
    """Load `start` into the engine and work out where this stage begins.

    The command line wins over the restored state: the DeepSpeed config's optimizer
    hyperparameters and this command's schedule settings are put back after loading.
    """
    wanted_schedule = _stage_settings(cfg, schedule.peak_lrs)
    wanted_hyperparameters = hyperparameters(schedule.optimizer)
    # A checkpoint without optimizer state (imported from transformers) gives its module weights only:
    # they fit any layout and precision, and the fp32 masters are refreshed from them.
    module_only = not start.has_optimizer_state
    check_checkpoint_dir(start.path)  # DeepSpeed unpickles the files in full: refuse unknown classes first
    try:
        load_path, client = engine.load_checkpoint(str(start.save_dir), tag=start.tag, load_module_only=module_only)
    except Exception as err:  # DeepSpeed raises assorted types for layout mismatches
        raise UserError(f"cannot load {start.path} on this layout (world size {comm.world_size()}, "
                        f"ep_size {cfg.ep_size}): {str(err).splitlines()[0]}") from None
    if load_path is None:
        raise UserError(f"DeepSpeed found no checkpoint in {start.path}")
    saved = Position(**client.get("ds_upcycle", {}).get("position", {"split": cfg.split}))
    new_stage = (cfg.fresh_schedule or module_only) and not resuming
    changes = reapply_hyperparameters(schedule.optimizer, wanted_hyperparameters)
    if new_stage:
        schedule.start_stage(**wanted_schedule)
    else:
        changes += schedule_changes(schedule.settings(), wanted_schedule, engine.global_steps + 1)
        schedule.update(**wanted_schedule)
    if resuming:
        current = _run_settings(cfg, data_cfg, engine.train_batch_size())
        changes += run_changes(start.run_record.run, current, RUN_FLAGS, engine.global_steps + 1)
        if saved.split != cfg.split:
            changes.append(f"--split {cfg.split} applies from step {engine.global_steps + 1}, from its first "
                           f"sample (the run was saved on {saved.split})")
    for line in changes:
        note(line)
    same_data = saved.split == cfg.split and (not new_stage or cfg.keep_data_position)
    return Position(cfg.split, saved.samples if same_data else 0, saved.tokens)


@dataclass
class Trainer:
    engine: object
    model: Transformer
    schedule: WSDSchedule
    cfg: TrainConfig
    data_cfg: DataConfig
    prepared: PreparedData
    position: Position
    origin: ImportOrigin | None = None   # the transformers model the run started from, kept in every record
    copy_of: tuple[tuple[int, ...], ...] | None = None   # an expansion's lineage, kept in every record
    lift_groups_at: int | None = None   # the step after which the routing groups go, kept in every record

    def __post_init__(self) -> None:
        self.is_main = comm.rank() == 0
        self.moe: list[LiveMoE] = live_moe_layers(self.model)
        train = PackedSequences(self.prepared.tokens(self.cfg.split), self.data_cfg.seq_len, self.cfg.split)
        self.val_data = PackedSequences(self.prepared.tokens("val"), self.data_cfg.seq_len, "val")
        self.order = BatchOrder(train, self.engine.train_micro_batch_size_per_gpu(),
                                self.engine.gradient_accumulation_steps(), comm.world_size(), comm.rank(),
                                seed=self.cfg.seed)
        save_dir = Path(self.cfg.save_dir) if self.cfg.save_dir else None
        self.metrics = MetricsLog(save_dir / "metrics.jsonl" if save_dir and self.is_main else None)

    def evaluate(self) -> dict:
        """{"val_loss": ...} and, after an expansion, how far its copies have moved apart ("copies")."""
        if self.copy_of is None:
            return {"val_loss": validation_loss(self.engine, self.val_data, self.cfg.eval_samples,
                                                self.order.micro_batch)}
        with counting(self.model, self.copy_of) as counter:
            loss = validation_loss(self.engine, self.val_data, self.cfg.eval_samples, self.order.micro_batch)
        return {"val_loss": loss, "copies": copy_diagnostics(self.model, self.copy_of, counter)}

    def save(self, step: int) -> None:
        tag = f"global_step{step}"
        if self.is_main:
            record = RunRecord(self.model.cfg, global_step=step, tokens_seen=self.position.tokens,
                               split=self.position.split, data=replace(self.data_cfg, cache_dir=None),
                               run=_run_settings(self.cfg, self.data_cfg, self.engine.train_batch_size()),
                               imported_from=self.origin, copy_of=self.copy_of, lift_groups_at=self.lift_groups_at)
            write_run_files(Path(self.cfg.save_dir) / tag, record, self.prepared.tokenizer_path)
        self.engine.save_checkpoint(self.cfg.save_dir, tag=tag,
                                    client_state={"ds_upcycle": {"position": asdict(self.position)}})

    def lift_groups_if_due(self) -> bool:
        """Past the recorded lift step, a token may take two copies of an expert again: the routers
        drop their groups, and so does the model config that the next save records."""
        due = self.lift_groups_at is not None and self.engine.global_steps >= self.lift_groups_at
        if not due or self.model.cfg.route_groups is None:
            return False
        set_routing_groups(self.model, None)
        self.model.cfg = self.model.cfg.replace(route_groups=None)
        note(f"routing groups lifted after step {self.engine.global_steps} (recorded lift step {self.lift_groups_at})")
        return True

    def train_step(self) -> dict:
        started, lr = time.perf_counter(), self.schedule.get_lr()[0]
        loss = _train_step(self.engine, self.order, self.position.samples)
        tokens = self.order.global_batch * self.data_cfg.seq_len
        self.position.samples += self.order.global_batch
        self.position.tokens += tokens
        load = balance_layers(self.moe, self.model.cfg.route_bias_update, comm.sum_over_world)
        step_time = time.perf_counter() - started
        layers = self.model.cfg.moe_layer_ids
        return {"step": self.engine.global_steps, "tokens": self.position.tokens, "loss": loss, "lr": lr,
                "step_time": step_time, "tokens_per_s": tokens / step_time,
                "load": [{"layer": layer, **stats} for layer, stats in zip(layers, load)]}

    def run(self) -> RunResult:
        cfg, stage_end = self.cfg, self.schedule.stage_start + self.cfg.steps
        if cfg.exit_at is not None:
            stage_end = min(stage_end, cfg.exit_at)
        bar = tqdm(total=cfg.steps, initial=self.engine.global_steps - self.schedule.stage_start,
                   disable=not self.is_main, desc=f"train ({cfg.split})", unit="step", dynamic_ncols=True)
        history, val_loss = [], float("nan")
        self.lift_groups_if_due()  # a run resumed past the lift step from a save taken before it
        while self.engine.global_steps < stage_end:
            record = self.train_step()
            if self.lift_groups_if_due():
                record["groups_lifted"] = True
            step, last = record["step"], record["step"] >= stage_end
            if last or (cfg.eval_interval and step % cfg.eval_interval == 0):
                record.update(self.evaluate())
                val_loss = record["val_loss"]
                if self.is_main:
                    bar.write(f"step {step}: val_loss {val_loss:.4f}")
            self.metrics.write(record)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            bar.update(1)
            if cfg.save_dir and (last or (cfg.save_interval and step % cfg.save_interval == 0)):
                self.save(step)
        bar.close()
        if not history:  # the stage was already complete
            val_loss = self.evaluate()["val_loss"]
        return RunResult(self.engine.global_steps, val_loss, self.position.tokens, history)


def run_training(train_cfg: TrainConfig, data_cfg: DataConfig, ds_config: dict, preset: str | None = None,
                 overrides: list[str] | None = None, vocab_size: int | None = None) -> RunResult:
    """Train one stage: from scratch, from --load, or resuming the run in --save.

    preset, overrides and vocab_size are what the user asked for (None: not given); a start
    checkpoint's own model and tokenizer take their place where they must.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_expert_parallel(train_cfg.ep_size, [], world, "--ep-size")
    if train_cfg.save_dir:  # before minutes of data preparation and training, not at the first save
        check_writable(train_cfg.save_dir, "--save directory")
    start, resuming = _start_checkpoint(train_cfg)
    model_cfg = _model_config(preset, overrides or [], start)
    check_expert_parallel(train_cfg.ep_size, model_cfg.experts_per_layer, ep_name="--ep-size")
    ds_config = engine_config(ds_config, model_cfg, train_cfg.ep_size)  # its refusals before any work

    if start is not None:
        _check_tokenizer(data_cfg, vocab_size, start)
        _check_layout(start, world, train_cfg.ep_size)
    resolve_source(data_cfg.source, data_cfg.text_field)  # a missing data file: refused before the processes meet

    comm.single_process_env()
    comm.init_distributed()
    prepared = _prepare(data_cfg, start.tokenizer if start else None)
    vocab = prepared.meta["vocab_size"]
    if start is None:
        model_cfg = model_cfg.replace(vocab_size=vocab)
    elif vocab > model_cfg.vocab_size:  # released models often pad their vocabulary: fewer ids is fine
        raise UserError(f"checkpoint vocab_size {model_cfg.vocab_size} is smaller than its tokenizer's ({vocab})")
    model = Transformer(model_cfg, ep_size=train_cfg.ep_size,
                        ep_rank=comm.rank() % train_cfg.ep_size, seed=train_cfg.seed)
    schedule_fn = partial(WSDSchedule, total=train_cfg.steps, warmup=train_cfg.warmup,
                          decay_fraction=train_cfg.decay_fraction, min_ratio=train_cfg.min_lr_ratio)
    engine, _, _, schedule = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                  config=ds_config,
                                                  lr_scheduler=schedule_fn)
    prepare_balancing(model)  # AutoEP's layers, now in the model: their bias, before a checkpoint restores it
    position = _restore(engine, schedule, start, resuming, train_cfg, data_cfg) if start else Position(train_cfg.split)
    record = start.run_record if start else RunRecord(model_cfg)
    trainer = Trainer(engine, model, schedule, train_cfg, data_cfg, prepared, position, record.imported_from,
                      record.copy_of, record.lift_groups_at)
    if resuming:
        trainer.metrics.truncate_after(engine.global_steps)
    return trainer.run()
