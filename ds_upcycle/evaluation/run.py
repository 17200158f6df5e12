"""`ds-upcycle eval`: run lm-eval tasks on a checkpoint and write one results file.

The results file is lm-eval's own results dictionary plus a `ds_upcycle` section: which checkpoint
(step, tokens, validation loss from its run's metrics.jsonl, model shape), and per requested task
the headline score, with the average over tasks. `ds-upcycle compare` reads that section.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lm_eval
from lm_eval import evaluator as lm_eval_evaluator
from lm_eval.loggers.utils import get_commit_from_path
from lm_eval.utils import handle_non_serializable

from ..atomic import check_writable, write_text_atomic
from ..checkpoint import CheckpointRef, find_checkpoint, read_metrics
from ..data.loader import PackedSequences
from ..errors import UserError
from ..trained import RunData, validation_loss
from . import RESULTS_FILE
from .lm_model import UpcycleLM
from .suites import TaskSpec, resolve_tasks
from .tasks import UpcycleTaskManager, go_offline, load_tasks



@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    Attributes:
        checkpoint: save directory (with `latest`) or tag directory.
        tasks: suite names, suite files and lm-eval task/group/tag names.
        num_fewshot: replaces every task's shot count when given.
        limit: at most this many documents per task (a fraction < 1: that share); for quick checks.
        batch_size, device, dtype, max_length, max_gen_toks, kv_cache: see UpcycleLM.
        data_dir: local copies of hub datasets (see ds_upcycle.evaluation.tasks).
        include_paths: more lm-eval task folders.
        offline: never try the network for datasets.
        output: results file (default: eval_results.json in the checkpoint's tag directory).
        log_samples: also write every request and response, next to the results file.
        seed: seeds lm-eval's random, numpy, torch and few-shot sampling.
        bootstrap_iters: resamples for standard errors (0: none).
        val_samples: measure the validation loss on the first this many sequences of `val_split`
            of the checkpoint's training data (0, or a checkpoint without data settings: the
            loss the training run recorded at this step, if any).
        val_split: the data split for that loss (pretrain, cpt or val).
        data_cache: prepared-data cache for it (default $DS_UPCYCLE_CACHE or ~/.cache/ds_upcycle).
    """

    checkpoint: str
    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    max_length: int | None = None
    max_gen_toks: int = 256
    kv_cache: bool = True
    data_dir: str | None = None
    include_paths: tuple[str, ...] = ()
    offline: bool = False
    output: str | None = None
    log_samples: bool = False
    seed: int = 0
    bootstrap_iters: int = 0
    val_samples: int = 256
    val_split: str = "val"
    data_cache: str | None = None

    def __post_init__(self) -> None:
        for option, value in (("--batch-size", self.batch_size), ("--max-gen-toks", self.max_gen_toks),
                              ("--max-length", self.max_length)):
            if value is not None and value < 1:
                raise UserError(f"{option} must be >= 1, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.val_samples < 0:
            raise UserError(f"--val-samples must be >= 0, got {self.val_samples}")
        if self.val_split not in ("pretrain", "cpt", "val"):
            raise UserError(f"--val-split must be pretrain, cpt or val, got {self.val_split!r}")


@dataclass
class EvalReport:
    path: Path
    scores: dict[str, float | None]
    average: float | None
    results: dict = field(repr=False)


def _validation_loss(ref: CheckpointRef, step: int | None) -> float | None:
    """The run's validation loss at the checkpoint's step, when its metrics.jsonl has it (recorded
    during training; `val_loss_measured_on` is absent then)."""
    metrics = ref.save_dir / "metrics.jsonl"
    if step is None or not metrics.is_file():
        return None
    values = [r["val_loss"] for r in read_metrics(metrics) if r.get("step") == step and "val_loss" in r]
    return values[-1] if values else None


def _loss_data(ref: CheckpointRef, cfg: EvalConfig) -> PackedSequences | None:
    """The split to measure the loss on, prepared before the (long) evaluation; None to skip."""
    if not cfg.val_samples or not ref.run_record.data_source:
        return None  # no data of its own (an imported model): no loss to measure
    return RunData(ref, cfg.data_cache).split(cfg.val_split)


def _measured_loss(lm: UpcycleLM, data: PackedSequences, cfg: EvalConfig) -> dict:
    """Loss of the loaded model on the first val_samples sequences (as train.py measures it)."""
    count = min(cfg.val_samples, data.num_samples)
    return {"val_loss": validation_loss(lm.model, data, count, cfg.batch_size),
            "val_loss_measured_on": {"split": cfg.val_split, "sequences": count}}


def headline(task_results: dict, metric: str | None) -> tuple[str | None, float | None]:
    """(metric key, value): the named metric, or the first one lm-eval reports for the task."""
    if metric is None:
        metric = next((k for k, v in task_results.items() if "," in k and "_stderr" not in k
                       and isinstance(v, (int, float))), None)
    value = task_results.get(metric) if metric else None
    return metric, (float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None)


def checkpoint_summary(ref: CheckpointRef, tasks: dict, val_loss: float | None) -> dict:
    """The `ds_upcycle` section of a results file: which checkpoint, its shape, task scores and their average."""
    record = ref.run_record
    values = [t["value"] for t in tasks.values() if t["value"] is not None]
    return {
        "checkpoint": str(ref.path), "tag": ref.tag, "global_step": record.global_step,
        "tokens_seen": record.tokens_seen, "val_loss": val_loss,
        "num_experts": record.model.num_experts, "top_k": record.model.top_k,
        "tasks": tasks, "average": sum(values) / len(values) if len(values) == len(tasks) and values else None,
    }


def summarize(results: dict, specs: list[TaskSpec], ref: CheckpointRef) -> dict:
    tasks = {}
    for spec in specs:
        task_results = {**results.get("groups", {}).get(spec.task, {}), **results["results"].get(spec.task, {})}
        metric, value = headline(task_results, spec.metric)
        tasks[spec.task] = {"metric": metric, "value": value, "num_fewshot": spec.num_fewshot}
    return checkpoint_summary(ref, tasks, _validation_loss(ref, ref.run_record.global_step))


def _quiet_git(evaluate):
    """lm-eval records the git commit of the working directory by running `git describe`, whose
    "fatal: not a git repository" reaches the terminal outside a repository. The same lookup, with
    git's complaint kept off the terminal, for the duration of the call."""
    @functools.wraps(evaluate)
    def call(*args, **kwargs):
        original = lm_eval_evaluator.get_git_commit_hash
        lm_eval_evaluator.get_git_commit_hash = _git_commit_hash
        try:
            return evaluate(*args, **kwargs)
        finally:
            lm_eval_evaluator.get_git_commit_hash = original
    return call


def _git_commit_hash() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)  # noqa: S607
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def run_eval(cfg: EvalConfig) -> EvalReport:
    """Evaluate cfg.checkpoint on cfg.tasks with lm-eval; write and return the results."""
    if cfg.offline:
        go_offline()
    ref = find_checkpoint(cfg.checkpoint)
    specs = resolve_tasks(list(cfg.tasks), cfg.num_fewshot)
    output = Path(cfg.output) if cfg.output else ref.path / RESULTS_FILE
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give the results file's path")
    check_writable(output, "results file")  # before the evaluation, which it would otherwise lose
    # Tasks first: a missing dataset should fail before minutes of model loading.
    manager = UpcycleTaskManager(cfg.include_paths, cfg.data_dir,
                                 metadata={"synthetic_source": ref.run_record.data_source},
                                 needed=[spec.task for spec in specs])
    objects = load_tasks(manager, specs)
    loss_data = _loss_data(ref, cfg)
    lm = UpcycleLM(checkpoint=str(ref.path), device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                   max_length=cfg.max_length, max_gen_toks=cfg.max_gen_toks, kv_cache=cfg.kv_cache)
    results = _quiet_git(lm_eval.simple_evaluate)(
        model=lm, tasks=objects, task_manager=manager, limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters,
        log_samples=cfg.log_samples, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    samples = results.pop("samples", None)
    results["ds_upcycle"] = summarize(results, specs, ref)
    if loss_data is not None:
        results["ds_upcycle"].update(_measured_loss(lm, loss_data, cfg))
    # The device that ran, which is not the one asked for where that one is missing (cuda on a CPU machine).
    results["ds_upcycle"]["eval_config"] = {**asdict(cfg), "device": str(lm.device)}

    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, json.dumps(results, indent=2, default=handle_non_serializable))
    if samples is not None:
        with output.with_name(output.stem + "_samples.jsonl").open("w") as f:
            for task, rows in samples.items():
                for row in rows:
                    f.write(json.dumps({"task": task, **row}, default=handle_non_serializable) + "\n")
    summary = results["ds_upcycle"]
    return EvalReport(output, {t: s["value"] for t, s in summary["tasks"].items()}, summary["average"], results)
