import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported

from ds_upcycle.comm import free_port  # noqa: E402  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = "synthetic:docs=1500,seed=0,entities=40"


def write_ds_config(path: Path, stage: int = 2, micro_batch: int = 4, grad_accum: int = 1, lr: float = 3e-3) -> Path:
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}))
    return path


def bf16_ds_config(path: Path, **changes) -> Path:
    """The shipped ds_configs/zero2_bf16.json with micro-batch 4 and `changes`, written to `path`."""
    config = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    path.write_text(json.dumps({**config, "train_micro_batch_size_per_gpu": 4, **changes}))
    return path


def run_train(args: list[str], num_procs: int = 0, cwd: Path = ROOT, timeout: int = 600,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run train.py as a user would: plain python (num_procs=0) or through the deepspeed launcher."""
    if num_procs:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
               "--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("RANK", None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def tiny_run_args(ds_config: Path, steps: int, data_cache: Path, *extra: str) -> list[str]:
    """train.py arguments for a fast tiny run on small synthetic data (later flags override earlier)."""
    return ["--deepspeed_config", str(ds_config), "--steps", str(steps), "--data", SMALL_DATA,
            "--vocab-size", "512", "--seq-len", "32", "--data-cache", str(data_cache),
            "--set", "dim=64", "--set", "dense_ffn_dim=128", "--set", "expert_ffn_dim=64",
            "--eval-samples", "16", *extra]


@pytest.fixture
def train_args(data_cache):
    def make(ds_config: Path, steps: int, *extra: str) -> list[str]:
        return tiny_run_args(ds_config, steps, data_cache, *extra)
    return make
