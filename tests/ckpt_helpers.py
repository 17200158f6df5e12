"""Helpers shared by the checkpoint tests: the stock-DeepSpeed oracle worker, comparisons, file digests."""

import json
import subprocess
from pathlib import Path

import torch

from conftest import ROOT, SMALL_DATA, check_ok, launch_env, launcher, one_process_launch, script_function
from ds_upcycle.checkpoint import CheckpointState, NonExpertState, ParamState
from ds_upcycle.moe.names import router_bias, router_weight


def load_pt(path: Path):
    return torch.load(path, weights_only=False)


WORKER = str(ROOT / "tests" / "workers" / "checkpoint_worker.py")


def run_worker(jobs: list[dict], world: int, jobs_file: Path) -> None:
    """The oracle (tests/workers/checkpoint_worker.py) on `world` processes, for every job at once;
    on one, its jobs in this process (conftest's one_process_launch)."""
    jobs_file.write_text(json.dumps(jobs))
    if world == 1:
        with one_process_launch():
            script_function(WORKER, "run_jobs")(jobs)
        return
    check_ok(subprocess.run([*launcher(world), WORKER, str(jobs_file)], cwd=ROOT,
                            env=launch_env(), capture_output=True, text=True, timeout=600, check=False))


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


def train_command(data_cache: Path, ds_config: Path, *extra: str) -> list[str]:
    """conftest's train_args for a module-scoped fixture; dim 70 and expert width 63 make DeepSpeed pad."""
    return ["--deepspeed_config", str(ds_config), "--steps", "3", "--data", SMALL_DATA, "--vocab-size", "512",
            "--seq-len", "32", "--data-cache", str(data_cache), "--set", "dim=70", "--set", "n_heads=5",
            "--set", "n_kv_heads=1", "--set", "dense_ffn_dim=128", "--set", "expert_ffn_dim=63",
            "--set", "moe_layer_freq=2", "--eval-samples", "8", *extra]


def assert_same_params(expected: dict[str, ParamState], dump: dict) -> None:
    assert sorted(expected) == sorted(dump["params"])
    for name, state in expected.items():
        got = dump["params"][name]
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(state, key), got[key]), (name, key)
        assert torch.equal(state.fp32, got["module"]), (name, "module weight")


def structure_diff(a, b, path: str = "") -> list[str]:
    """Differences between two loaded checkpoint files, tensors compared bit for bit."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
        return [] if same and torch.equal(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [] if list(a) == list(b) else [f"{path}: keys {sorted(set(a) ^ set(b))} or order differ"]
        return keys + [d for k in a if k in b for d in structure_diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in structure_diff(x, y, f"{path}[{i}]")]
    if type(a).__name__ == type(b).__name__ == "LossScaler":
        return structure_diff(vars(a), vars(b), path)
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r:.60} vs {b!r:.60}"]


def assert_deepspeed_saves_the_same(ours: Path, theirs: Path) -> None:
    """DeepSpeed, saving what it loaded from our files, writes exactly our files."""
    files = sorted(p.name for p in ours.glob("*.pt"))
    assert files == sorted(p.name for p in theirs.glob("*.pt"))
    for file in files:
        diff = structure_diff(load_pt(ours / file), load_pt(theirs / file))
        assert not diff, (file, diff[:5])


def duplicate_experts(state: CheckpointState) -> CheckpointState:
    """E -> 2E: expert g + E copies expert g; router rows and routing biases follow."""
    params, buffers = dict(state.non_expert.params), dict(state.non_expert.buffers)
    experts = {}
    for layer in state.moe_layers:
        count = layer.num_experts
        experts.update({(layer.index, g): state.experts[(layer.index, g % count)] for g in range(2 * count)})
        weight, bias = router_weight(layer.prefix), router_bias(layer.prefix)
        params[weight] = params[weight].map(lambda t: torch.cat([t, t]))
        buffers[bias] = torch.cat([buffers[bias]] * 2)
    layers = [layer.with_experts(2 * layer.num_experts) for layer in state.moe_layers]
    return CheckpointState(state.meta, layers, NonExpertState(params, buffers), experts)
