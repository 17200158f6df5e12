"""Time and peak memory of `ds-upcycle expand` against a plain copy of the same checkpoint.

Builds (once, cached in --workdir) a synthetic ZeRO-2 fp32 MoE checkpoint of about --size-mb on
disk, written for 2 ranks with ep_size 2, with random weights and Adam moments (no training).
Then times a plain `shutil.copytree` of its tag directory (the I/O floor), `expand --multiplier 2`
(same layout) and `--multiplier 1` reshard to (1, 1). Each expand runs in a fresh subprocess that
reports its own wall time and peak memory (VmHWM, and the peak of anonymous memory sampled every
20 ms: file pages of the mmapped source count in VmHWM but can be dropped by the kernel).

    DS_ACCELERATOR=cpu python scripts/bench_expand.py --size-mb 600
    python scripts/bench_expand.py --workdir runs/bench-expand/cache --keep   # reuse the source
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Model shape: every block MoE; the number of blocks is chosen to reach --size-mb.
SHAPE = {"vocab_size": 4096, "dim": 512, "n_heads": 8, "n_kv_heads": 2, "dense_ffn_dim": 1024,
         "expert_ffn_dim": 512, "num_experts": 8, "top_k": 2, "moe_layer_freq": 1}
TAG = "global_step10"


def model_config(n_layers: int):
    from ds_upcycle.config import ModelConfig

    return ModelConfig(n_layers=n_layers, **SHAPE)


def param_counts(cfg) -> tuple[int, int]:
    """(parameters of one MoE layer's experts, non-expert parameters), from the model on the meta device."""
    import torch

    from ds_upcycle.checkpoint.names import split_expert_param
    from ds_upcycle.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    names = model.global_param_names()
    expert = sum(p.numel() for n, p in model.named_parameters() if split_expert_param(names[n]))
    dense = sum(p.numel() for n, p in model.named_parameters() if not split_expert_param(names[n]))
    return expert // len(cfg.moe_layer_ids), dense


def layers_for(size_mb: float) -> int:
    """Blocks needed for size_mb on disk (16 bytes per parameter: module weight + fp32 + 2 moments)."""
    def total(n_layers: int) -> int:
        cfg = model_config(n_layers)
        expert, dense = param_counts(cfg)
        return expert * len(cfg.moe_layer_ids) + dense

    per_layer = total(2) - total(1)
    fixed = total(1) - per_layer
    return max(1, math.ceil((size_mb * 1e6 / 16 - fixed) / per_layer))


def synthetic_state(cfg):
    """A CheckpointState for cfg with random weights and moments (as tests/test_checkpoint_io.py builds it)."""
    import torch

    from ds_upcycle.checkpoint import (
        CheckpointMeta,
        CheckpointState,
        MoELayer,
        NonExpertState,
        ParamGroup,
        ParamState,
        RunRecord,
    )
    from ds_upcycle.checkpoint.names import split_expert_param
    from ds_upcycle.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    gen = torch.Generator().manual_seed(0)

    def state_of(shape) -> ParamState:
        return ParamState(torch.randn(shape, generator=gen) * 0.02, torch.randn(shape, generator=gen) * 1e-3,
                          torch.rand(shape, generator=gen) * 1e-6)

    names = model.global_param_names()
    dense = {n: state_of(p.shape) for n, p in model.named_parameters() if split_expert_param(names[n]) is None}
    experts, layers = {}, []
    for index, block_id in enumerate(cfg.moe_layer_ids):
        prefix, shapes = f"layers.{block_id}.ffn.moe", {}
        for name, param in model.named_parameters():
            split = split_expert_param(names[name])
            if split and split[0] == prefix:
                experts.setdefault((index, split[1]), {})[split[2]] = state_of(param.shape)
                shapes[split[2]] = param.shape
        layers.append(MoELayer(index, prefix, cfg.num_experts, shapes))
    module_keys = [k for k in model.state_dict() if split_expert_param(k) is None]
    buffers = {k: torch.zeros(model.state_dict()[k].shape) for k in module_keys if "route_bias" in k}
    ds_config = json.loads((Path(__file__).parents[1] / "ds_configs" / "zero2_fp32.json").read_text())
    hypers = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-08, "weight_decay": 0.1, "amsgrad": False}
    meta = CheckpointMeta(
        global_steps=10, global_samples=160, skipped_steps=0, lr_scheduler=None, client_state={},
        ds_config=ds_config, ds_version="0.19.8", zero_stage=2, dp_world_size=2, ep_size=2,
        module_dtype=torch.float32, optimizer_step=torch.tensor(10.0),
        dense_groups=[ParamGroup({"name": "dense-params", **hypers}, list(dense))],
        expert_hypers={"name": "ep_size_2", "moe": True, **hypers}, optimizer_extras={"clip_grad": 1.0},
        module_keys=module_keys, buffer_names=list(buffers), shared_params={}, model_extras={},
        run_record=RunRecord(cfg))
    return CheckpointState(meta, layers, NonExpertState(dense, buffers), experts)


def build_source(workdir: Path, size_mb: float) -> Path:
    """The cached source save dir (written once for 2 ranks, ep_size 2)."""
    from ds_upcycle.checkpoint import write_checkpoint

    src = workdir / f"src-{size_mb:g}mb"
    if (src / "latest").exists():
        print(f"reusing {src}")
        return src
    cfg = model_config(layers_for(size_mb))
    started = time.perf_counter()
    write_checkpoint(synthetic_state(cfg), src, TAG, world_size=2, ep_size=2)
    print(f"built {src} ({cfg.n_layers} MoE blocks) in {time.perf_counter() - started:.1f} s")
    return src


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_copy(src_tag: Path, dst: Path, repeats: int = 3) -> float:
    """Best of `repeats` copies: the floor, least disturbed by write-back of earlier runs."""
    best = math.inf
    for _ in range(repeats):
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()   # no write-back of earlier runs' pages during the timing
        started = time.perf_counter()
        shutil.copytree(src_tag, dst)
        best = min(best, time.perf_counter() - started)
    return best


def run_expand(src: Path, dst: Path, multiplier: int, world: int | None, ep: int | None, repeats: int = 2) -> dict:
    """expand in a fresh interpreter, best of `repeats` (as the copy); its seconds and memory figures (bytes)."""
    args = json.dumps([str(src), str(dst), multiplier, world, ep])
    best = None
    for _ in range(repeats):
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()   # as for the copy: start with no dirty pages of earlier runs
        started = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", args], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.perf_counter() - started
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    return best


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: str) -> None:
    """Runs in the subprocess: one expand, then one JSON line on stdout."""
    src, dst, multiplier, world, ep = json.loads(args)
    from ds_upcycle.upcycle.config import ExpandConfig
    from ds_upcycle.upcycle.expand import expand_checkpoint

    baseline, baseline_anon = _status_kb("VmRSS"), _status_kb("RssAnon")
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    expand_checkpoint(ExpandConfig(src, dst, multiplier=multiplier, world_size=world, ep_size=ep), progress=False)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "baseline_rss": baseline * 1024,
                      "baseline_anon": baseline_anon * 1024, "vm_hwm": _status_kb("VmHWM") * 1024,
                      "peak_anon": peak_anon[0] * 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the source is cached and outputs go (default: a new dir under runs/bench-expand)")
    parser.add_argument("--size-mb", type=float, default=600, help="target size of the source on disk")
    parser.add_argument("--keep", action="store_true", help="keep the outputs (and a temporary workdir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    temporary = args.workdir is None     # an explicit --workdir keeps the source for the next run
    if temporary:
        Path("runs/bench-expand").mkdir(parents=True, exist_ok=True)
        args.workdir = Path(tempfile.mkdtemp(dir="runs/bench-expand"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = build_source(args.workdir, args.size_mb)
    outputs = [args.workdir / name for name in ("copy", "expand-m2", "reshard-m1-1x1")]
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
    try:
        report(src, *outputs)
    finally:
        if not args.keep:
            for path in outputs:
                shutil.rmtree(path, ignore_errors=True)
            if temporary:
                shutil.rmtree(args.workdir, ignore_errors=True)


def report(src: Path, copy_dst: Path, expand_dst: Path, reshard_dst: Path) -> None:
    from ds_upcycle.checkpoint import read_checkpoint

    reader = read_checkpoint(src)
    cfg = model_config(len(reader.moe_layers))
    expert, dense = param_counts(cfg)
    layer_state, dense_state = 12 * expert, 12 * dense     # fp32 weight + 2 Adam moments
    budget = 2 * layer_state + dense_state
    del reader

    size = tree_bytes(src / TAG)
    copy_s = timed_copy(src / TAG, copy_dst)   # warm: the source was just written or read
    runs = {"expand -m 2 (2,2)->(2,2)": (run_expand(src, expand_dst, 2, None, None), expand_dst),
            "reshard -m 1 (2,2)->(1,1)": (run_expand(src, reshard_dst, 1, 1, 1), reshard_dst)}

    def mb(n: float) -> str:
        return f"{n / 1e6:,.0f} MB"

    print(f"\nsource: {src} ({cfg.n_layers} MoE layers x {cfg.num_experts} experts, "
          f"dim {cfg.dim}, expert FFN {cfg.expert_ffn_dim}; ZeRO-2 fp32, world 2, ep 2)")
    print(f"source bytes: {size:,} ({mb(size)}); plain copy (page cache warm, best of 3): {copy_s:.2f} s "
          f"({size / copy_s / 1e9:.2f} GB/s)")
    print(f"one MoE layer's expert state (w + 2 moments, fp32): {mb(layer_state)}; "
          f"non-expert state: {mb(dense_state)}; aim 2 x layer + non-expert: {mb(budget)}")
    print("\n| run | bytes written | seconds | x copy | x copy per byte written | peak RSS (VmHWM) | RSS before | "
          "peak RSS / aim | peak anon RSS | anon before | (peak - before) anon / aim |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (r, dst) in runs.items():
        written = tree_bytes(dst)
        per_byte = r['seconds'] / (copy_s * written / size)   # against the copy's rate, for the bytes written
        print(f"| {name} | {mb(written)} | {r['seconds']:.2f} | {r['seconds'] / copy_s:.2f} | {per_byte:.2f} | "
              f"{mb(r['vm_hwm'])} | "
              f"{mb(r['baseline_rss'])} | {r['vm_hwm'] / budget:.2f} | {mb(r['peak_anon'])} | "
              f"{mb(r['baseline_anon'])} | {(r['peak_anon'] - r['baseline_anon']) / budget:.2f} |")
    print("\nseconds: expand_checkpoint() alone, in a fresh process (interpreter start and imports excluded: "
          + ", ".join(f"{r['process_seconds'] - r['seconds']:.1f} s" for r, _ in runs.values()) + ")")


if __name__ == "__main__":
    main()
