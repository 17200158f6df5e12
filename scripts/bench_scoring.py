"""The scoring pass on a release-sized model: `train.py --score-experts` timed, and set against the
one-process CPU calibration on the same batches (the two must agree; the ratio is what moving the
scores onto the training hardware buys).

Builds a random OLMoE release of about --size GB (scripts/bench_scale.py's builder), imports it,
then, each in a fresh process:

    pass   [deepspeed --num_gpus G] train.py --deepspeed_config CFG --load CKPT --score-experts F
           --score-data DATA --score-batches N          (bf16 on a GPU, fp32 on CPU)
and, with --cpu-reference (small sizes only), the one-process calibration behind `expand
--calibration-data DATA` (upcycle.calibration.calibrate, in this process) on the same batches. It
prints one JSON object: the pass's own seconds (engine set-up, loading and the batches, as the file
records) and its command's wall seconds, and with the CPU reference that path's seconds (model
load and the batches) and the largest relative difference of the grad_sq scores.

    DS_ACCELERATOR=cpu python scripts/bench_scoring.py --size 0.1 --context 256 --cpu-reference
    python scripts/bench_scoring.py --size 2 --gpus 1 --bf16 --micro-batch 8     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:docs=3000,seed=3"


def run(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def ds_config(path: Path, micro_batch: int, bf16: bool) -> Path:
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    if bf16:
        config["bf16"] = {"enabled": True}
    path.write_text(json.dumps(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=0.1, help="release size in GB (bf16 weights)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-scoring")
    parser.add_argument("--gpus", type=int, default=0, help="processes under the deepspeed launcher (0: one, plain)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--context", type=int, default=512, help="the release's context: the scoring windows' length")
    parser.add_argument("--cpu-reference", action="store_true", help="also score with expand --calibration-data")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    bench_scale.RELEASE["max_position_embeddings"] = args.context
    layers = bench_scale.layers_for(args.size)
    name = f"{args.size}gb-ctx{args.context}"
    release = bench_scale.build_release(work / f"release-{name}", layers)
    ckpt = work / f"imported-{name}"
    if not ckpt.exists():
        run([sys.executable, "-m", "ds_upcycle.cli", "import", str(release), str(ckpt)])
    world = max(1, args.gpus)
    cfg = ds_config(work / "ds.json", args.micro_batch, args.bf16)
    scores = work / "scores.json"
    launcher = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.gpus)]
                if args.gpus else [sys.executable])
    wall = run([*launcher, str(ROOT / "train.py"), "--deepspeed_config", str(cfg), "--load", str(ckpt),
                "--ep-size", str(world), "--score-experts", str(scores), "--score-data", DATA,
                "--score-batches", str(args.batches), "--data-cache", str(work / "cache")])
    measured = json.loads(scores.read_text())
    result = {"size_gb": args.size, "layers": layers, "processes": world, "precision": measured["info"]["precision"],
              "batches": args.batches, "batch_size": measured["info"]["batch_size"],
              "seq_len": measured["info"]["seq_len"], "pass_seconds": measured["info"]["seconds"],
              "pass_wall_seconds": round(wall, 1)}
    if args.cpu_reference:
        from ds_upcycle.checkpoint import read_checkpoint
        from ds_upcycle.trained import RunData
        from ds_upcycle.upcycle.calibration import calibrate

        started = time.perf_counter()
        cpu = calibrate(read_checkpoint(ckpt), RunData(ckpt, str(work / "cache")), DATA, args.batches,
                        measured["info"]["batch_size"])
        seconds = time.perf_counter() - started
        diff = max(abs(a - b) / max(abs(a), 1e-30) for prefix, rules in cpu.layers.items()
                   for a, b in zip(rules["grad_sq"], measured["layers"][prefix]["grad_sq"]))
        result.update(cpu_seconds=round(seconds, 1), cpu_over_pass=round(seconds / measured["info"]["seconds"], 2),
                      grad_sq_max_rel_diff=diff)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
