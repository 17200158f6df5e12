"""Helpers shared by the checkpoint tests: the stock-DeepSpeed oracle worker and file digests."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT, free_port


def load_pt(path: Path):
    return torch.load(path, weights_only=False)


def check_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_worker(jobs: list[dict], world: int, ep_size: int, jobs_file: Path) -> None:
    jobs_file.write_text(json.dumps(jobs))
    script = str(ROOT / "tests" / "workers" / "checkpoint_worker.py")
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
                "--master_port", str(free_port())] if world > 1 else [sys.executable]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    check_ok(subprocess.run([*launcher, script, "--ep-size", str(ep_size), str(jobs_file)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False))


def merged_dump(prefix: Path, world: int) -> dict:
    """Rank 0's dump with the parameters of every rank (each rank holds its own experts)."""
    dumps = [load_pt(f"{prefix}.rank{rank}.pt") for rank in range(world)]
    params = {}
    for dump in dumps:
        for name, tensors in dump["params"].items():
            if name in params:  # replicated on several ranks: DeepSpeed must agree with itself
                assert all(torch.equal(params[name][k], tensors[k]) for k in tensors), name
            params[name] = tensors
    return {**dumps[0], "params": params}


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
