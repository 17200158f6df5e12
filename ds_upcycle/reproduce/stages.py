"""Running one stage of the experiment: train.py as a subprocess, or an expansion in process.

A stage is complete when its arm directory holds COMPLETE.json, written only after the stage
finished; an incomplete stage is simply run again (train.py resumes from its own last checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ds_upcycle

from ..atomic import staged_dir, write_json_atomic
from ..comm import free_port
from ..errors import UserError
from ..choices import GRADIENT_FREE_RULES
from ..upcycle.config import ExpandConfig
from ..upcycle.expand import expand_checkpoint
from .config import ReproduceConfig
from .experiment import Experiment
from .plan import BranchStage, ExpandStage, TrainStage

MARKER = "COMPLETE.json"


def repo_root() -> Path:
    """The checkout holding train.py and ds_configs/ (ds-upcycle is installed from a checkout)."""
    root = Path(ds_upcycle.__file__).resolve().parents[1]
    if not (root / "train.py").is_file():
        raise UserError(f"train.py not found next to the ds_upcycle package ({root}); install ds-upcycle "
                        f"from a checkout with pip install -e .")
    return root


def deepspeed_config_path(cfg: ReproduceConfig) -> Path:
    path = Path(cfg.deepspeed_config)
    for candidate in (path, repo_root() / "ds_configs" / path):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"DeepSpeed config {cfg.deepspeed_config} not found (as a path or in ds_configs/)")


def stage_deepspeed_config(exp: Experiment, stage: TrainStage) -> Path:
    """The DeepSpeed config a stage trains with: the config's own, or (lr_scale) its copy with the
    learning rate scaled, which run_train_stage writes under OUT/ds_configs/."""
    if stage.lr_scale == 1:
        return deepspeed_config_path(exp.cfg)
    return (exp.out / "ds_configs" / f"{stage.name}.json").resolve()


def write_scaled_deepspeed_config(source: Path, scale: float, path: Path) -> None:
    config = json.loads(source.read_text())
    params = config.get("optimizer", {}).get("params", {})
    if not isinstance(params.get("lr"), (int, float)):
        raise UserError(f"cpt_lr_scale scales the optimizer's lr, which {source} does not set")
    params["lr"] = params["lr"] * scale
    write_json_atomic(path, config)


def is_complete(arm_dir: Path) -> bool:
    return (arm_dir / MARKER).is_file()


def mark_complete(arm_dir: Path, record: dict) -> None:
    write_json_atomic(arm_dir / MARKER, record)


def data_args(exp: Experiment) -> list[str]:
    cfg, data_cache = exp.cfg, exp.data_cache
    args = ["--data", str(cfg.data), "--text-field", cfg.text_field, "--seq-len", str(cfg.seq_len),
            "--vocab-size", str(cfg.vocab_size), "--val-fraction", str(cfg.val_fraction),
            "--cpt-fraction", str(cfg.cpt_split_fraction)]
    return args + (["--data-cache", data_cache] if data_cache else [])


def train_args(exp: Experiment, stage: TrainStage) -> list[str]:
    """train.py arguments of a stage (the model comes from the preset only for runs from scratch)."""
    cfg, out = exp.cfg, exp.out
    args = ["--deepspeed_config", str(stage_deepspeed_config(exp, stage)), *data_args(exp),
            "--steps", str(stage.steps), "--warmup-steps", str(_warmup(cfg, stage)),
            "--decay-fraction", str(stage.decay_fraction if stage.decay_fraction is not None else cfg.decay_fraction),
            "--micro-batch-size", str(stage.micro_batch_size or cfg.micro_batch_size),
            "--grad-accum-steps", str(cfg.grad_accum_steps), "--ep-size", str(cfg.ep_size), "--seed", str(cfg.seed),
            "--eval-interval", str(cfg.eval_interval), "--eval-samples", str(cfg.eval_samples),
            "--save", str(out / stage.name)]
    if stage.load:
        args += ["--load", str(out / stage.load), "--split", stage.split, "--fresh-schedule"]
    else:
        # Pre-training runs share one warmup length, so a source run equals Fixed-E up to its anneal.
        args += ["--model", cfg.model, *(a for item in cfg.model_overrides for a in ("--set", item)),
                 "--set", f"num_experts={stage.experts}", "--split", stage.split]
    if stage.save_interval:
        args += ["--save-interval", str(stage.save_interval)]
    if stage.exit_at is not None:
        args += ["--exit-at", str(stage.exit_at)]
    if stage.keep_data_position:
        args.append("--keep-data-position")
    return args


def _warmup(cfg: ReproduceConfig, stage: TrainStage) -> int:
    if stage.warmup is not None:
        return stage.warmup
    return cfg.stage_warmup(stage.steps if stage.load else cfg.total_steps)


def launch_command(cfg: ReproduceConfig, args: list[str]) -> list[str]:
    train = str(repo_root() / "train.py")
    if cfg.num_procs == 1:
        return [sys.executable, train, *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.num_procs),
            "--master_port", str(free_port()), train, *args]


def _env(cfg: ReproduceConfig) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher above us must not make train.py think it is one of its ranks
    return env


def branch_checkpoint(src_dir: Path, step: int, dst_dir: Path) -> None:
    """Make dst_dir a save directory holding src_dir's checkpoint at `step` and its metrics so far."""
    tag = f"global_step{step}"
    if not (src_dir / tag).is_dir():
        raise UserError(f"{src_dir} has no checkpoint {tag} to continue from; remove {src_dir} to retrain it")
    records = [line for line in (src_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip() and json.loads(line)["step"] <= step]
    # What an interrupted earlier attempt left in dst_dir (it has no checkpoint yet) is replaced.
    with staged_dir(dst_dir, "replace") as staging:
        shutil.copytree(src_dir / tag, staging / tag)
        (staging / "latest").write_text(tag)
        (staging / "metrics.jsonl").write_text("".join(line + "\n" for line in records))
        (staging / "BRANCHED_FROM.json").write_text(json.dumps({"arm": src_dir.name, "step": step}) + "\n")


def run_train_stage(exp: Experiment, stage: TrainStage) -> dict:
    cfg, out = exp.cfg, exp.out
    arm_dir = out / stage.name
    if stage.branch and not (arm_dir / "latest").is_file():
        branch_checkpoint(out / stage.branch[0], stage.branch[1], arm_dir)
    arm_dir.mkdir(parents=True, exist_ok=True)
    if stage.lr_scale != 1:
        path = stage_deepspeed_config(exp, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_scaled_deepspeed_config(deepspeed_config_path(cfg), stage.lr_scale, path)
    command = launch_command(cfg, train_args(exp, stage))
    started = time.perf_counter()
    with (arm_dir / "train.log").open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        # In the caller's directory: relative --out, --data and --data-cache mean the same to both.
        proc = subprocess.run(command, env=_env(cfg), stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = (arm_dir / "train.log").read_text().strip().splitlines()[-1:] or [""]
        raise UserError(f"stage {stage.name} failed (exit {proc.returncode}): {tail[0][:200]} "
                        f"(full log: {arm_dir / 'train.log'})")
    return {"stage": stage.name, "kind": "train", "steps": stage.steps, "seconds": time.perf_counter() - started,
            "command": command[1:], "branched_from": list(stage.branch) if stage.branch else None}


def run_branch_stage(exp: Experiment, stage: BranchStage) -> dict:
    arm_dir = exp.out / stage.name
    if not (arm_dir / "latest").is_file():
        branch_checkpoint(exp.out / stage.branch[0], stage.branch[1], arm_dir)
    return {"stage": stage.name, "kind": "branch", "branched_from": list(stage.branch)}


def prune_checkpoints(save_dir: Path) -> None:
    """Drop a finished run's intermediate checkpoints (branches are copies): only the last is used."""
    latest = (save_dir / "latest").read_text().strip()
    for tag_dir in save_dir.glob("global_step*"):
        if tag_dir.is_dir() and tag_dir.name != latest:
            shutil.rmtree(tag_dir)


def run_expand_stage(exp: Experiment, stage: ExpandStage) -> dict:
    cfg, out = exp.cfg, exp.out
    started = time.perf_counter()
    expand_cfg = ExpandConfig(source=str(out / stage.source), destination=str(out / stage.name),
                              multiplier=None if stage.num_experts else cfg.multiplier,
                              num_experts=stage.num_experts, select=stage.select, router_noise=cfg.router_noise,
                              router_noise_relative=cfg.router_noise_relative, allocate=cfg.allocate,
                              optimizer_state=cfg.optimizer_state,
                              calibration_data=None if stage.select in GRADIENT_FREE_RULES else cfg.calibration_data,
                              distinct_copies=cfg.distinct_copies, split_copies=cfg.split_copies,
                              lift_groups_after=cfg.lift_groups_after, reinit_fraction=cfg.reinit_fraction,
                              seed=cfg.seed, force=True, check_data=True, check_samples=cfg.eval_samples,
                              data_cache=exp.data_cache)
    result = expand_checkpoint(expand_cfg, progress=False)
    return {"stage": stage.name, "kind": "expand", "seconds": time.perf_counter() - started,
            "tag": result.tag, "warm_start": result.manifest.get("warm_start")}
