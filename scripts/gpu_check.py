"""Helpers of scripts/gpu_check.sh: the machine's description, the reproduction's size, the figures.

    python3 scripts/gpu_check.py env                      # GPU, driver and package versions as JSON
    python3 scripts/gpu_check.py repro-config METRICS SECONDS DS_CONFIG DEVICE DTYPE [TOTAL_STEPS]
    python3 scripts/gpu_check.py collect WORK             # every figure of a check as one JSON
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

# Arm steps of a reproduction without the selection comparison, in units of T: Fixed-E, Fixed-mE,
# the source (1 - cpt) T plus its CPT cpt T, and the control's cpt T at cpt = 0.5.
ARM_STEPS_PER_T = 3.5


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for package in ("deepspeed", "lm_eval", "datasets", "transformers", "sentencepiece", "numpy"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def step_seconds(metrics: Path) -> float:
    """Median step time of a run, its first 10 steps (start-up, compilation) left out."""
    times = [json.loads(line)["step_time"] for line in metrics.read_text().splitlines()[10:]]
    return statistics.median(times)


def repro_config(metrics: Path, seconds: float, ds_config: str, device: str, dtype: str,
                 total: int | None = None) -> dict:
    if total is None:
        total = int(min(1600, max(40, seconds / (ARM_STEPS_PER_T * step_seconds(metrics)))))
    # One seed, the main arm and the control: a check of the path within a time limit. The stable
    # transition branches Fixed-E at T0 = T/2, which must be a multiple of its checkpoint interval T/20.
    total = max(40, total // 40 * 40)
    return {"base": "tiny", "name": "gpu-check", "total_steps": total, "selection_cpt_fraction": None,
            "cpt_sweep": [], "seeds": [],
            "deepspeed_config": ds_config, "micro_batch_size": 16, "eval_interval": max(1, total // 8),
            "eval_device": device, "eval_dtype": dtype, "eval_batch_size": 32 if device == "cuda" else 8,
            "threads": 4 if device == "cuda" else 1}


def _read_json(path: Path):
    """A step's figures, or None where the step did not run or left no valid file (the log says why)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(work: Path) -> dict:
    figures = {"environment": _read_json(work / "env.json"),
               "steps": [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
               if (work / "steps.jsonl").is_file() else []}
    metrics = work / "quickstart" / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        val_losses = [r["val_loss"] for r in records if "val_loss" in r]
        figures["quickstart"] = {"steps": len(records), "val_loss": val_losses[-1:],
                                 "median_step_s": step_seconds(metrics),
                                 "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[10:])}
    for name in ("train_il8", "train_full", "eval", "score", "repro"):
        figures[name] = _read_json(work / f"{name}.json")
    figures["repro_summary"] = _read_json(work / "repro" / "results" / "summary.json")
    figures["repro_compare"] = _read_json(work / "repro" / "results" / "compare.json")
    return figures


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "env":
        result = environment()
    elif command == "repro-config":
        metrics, seconds, ds_config, device, dtype, *total = args
        result = repro_config(Path(metrics), float(seconds), ds_config, device, dtype, *map(int, total))
    elif command == "collect":
        result = collect(Path(args[0]))
    else:
        raise SystemExit(f"unknown command {command!r}; see the docstring")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
