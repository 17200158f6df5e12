"""Peak memory, time and bytes written of import, expand, export and eval loading, on releases of three sizes.

Builds random `OlmoeForCausalLM` releases (hidden 1024, 32 experts of width 512, top-4, q/k norm;
bf16 safetensors in 500 MB shards, a SentencePiece tokenizer) of about --sizes GB each, by writing
the tensors under transformers' names shard by shard (no model is built), then runs on each, as a
user does, every command in a fresh process:

    import       ds-upcycle import RELEASE CKPT
    expand       ds-upcycle expand CKPT E2X -m 2 --select uniform
    export       ds-upcycle export E2X HF --dtype bfloat16
    eval-load    the loading behind `ds-upcycle eval --dtype bfloat16`: trained.load_model and one forward

A sampler reads the process's /proc status every 20 ms: peak anonymous memory (RssAnon: what the
process holds itself; memory-mapped file pages are the page cache's and can be dropped) and peak
resident memory (VmHWM). An idle process that only imports the libraries is measured the same way:
what a command holds beyond it is its own, set against the non-expert state in fp32 (embeddings,
head, attention, norms, routers: it grows with depth, not with the number of experts). The last table gives, per command, the ratio of the
largest release's peak anonymous memory (beyond idle) to the smallest's: flat (near 1) means memory
bounded by a layer, not by the model.

    DS_ACCELERATOR=cpu python scripts/bench_scale.py --sizes 0.25,1,2 --workdir runs/bench-scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASE = {"hidden_size": 1024, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8,
           "num_experts": 32, "num_experts_per_tok": 4, "vocab_size": 8192, "max_position_embeddings": 4096,
           "norm_topk_prob": False, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 2,
           "pad_token_id": 2}
SHARD_BYTES = 500 * 10**6


def non_expert_params(n_layers: int) -> int:
    """Parameters outside the experts (embeddings, head, attention, norms, routers): the state that
    import and expand hold in fp32 whatever the number of experts."""
    d, e, v = RELEASE["hidden_size"], RELEASE["num_experts"], RELEASE["vocab_size"]
    return 2 * v * d + d + n_layers * (4 * d * d + 4 * d + e * d)


def layers_for(size_gb: float) -> int:
    """Decoder layers for about size_gb of bf16 weights."""
    d, e, f, v = RELEASE["hidden_size"], RELEASE["num_experts"], RELEASE["intermediate_size"], RELEASE["vocab_size"]
    per_layer = 4 * d * d + 2 * d + e * d + e * 3 * d * f + 2 * d
    return max(1, round((size_gb * 1e9 / 2 - 2 * v * d) / per_layer))


def build_release(out: Path, n_layers: int) -> Path:
    """A random release: config.json, bf16 safetensors shards with an index, tokenizer.model."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from ds_upcycle.data.sources import resolve_source
    from ds_upcycle.data.tokenizer import train_tokenizer
    from ds_upcycle.hf.olmoe import FAMILY
    from ds_upcycle.model import Transformer

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = transformers.OlmoeConfig(num_hidden_layers=n_layers, **RELEASE)
    config.save_pretrained(str(tmp))
    cfg = FAMILY.config_from_hf(config.to_dict())
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush() -> None:
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, str(tmp / files[-1]), metadata={"format": "pt"})
        weight_map.update((name, files[-1]) for name in shard)
        shard.clear()

    for ours, theirs in FAMILY.name_pairs(cfg):
        tensor = (torch.randn(shapes[ours], generator=gen) * 0.02).to(torch.bfloat16)
        if "norm" in ours:
            tensor = torch.ones(shapes[ours], dtype=torch.bfloat16)
        if shard and size + tensor.numel() * 2 > SHARD_BYTES:
            flush()
            size = 0
        shard[theirs] = tensor
        size += tensor.numel() * 2
    flush()
    total = sum((tmp / f).stat().st_size for f in files)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    docs = [doc for _, doc in zip(range(3000), resolve_source("synthetic", "text").documents())]
    train_tokenizer(docs, 2048, tmp / "tokenizer.model")
    tmp.rename(out)
    return out


IDLE = "import ds_upcycle.hf.importer, ds_upcycle.hf.export, ds_upcycle.upcycle.expand, ds_upcycle.trained"
EVAL_LOAD = """
import sys, time, torch
from ds_upcycle.trained import load_model
started = time.perf_counter()
model = load_model(sys.argv[1], "cpu", torch.bfloat16).model
with torch.no_grad():
    model(torch.zeros(1, 128, dtype=torch.long))
print(f"loaded and ran one forward in {time.perf_counter() - started:.1f} s")
"""


def _status_kb(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("RssAnon", "VmHWM")}


def run_measured(command: list[str], written: Path | None) -> dict:
    """Run a command, sampling its memory every 20 ms; seconds, peaks (bytes) and bytes written."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"RssAnon": 0, "VmHWM": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _status_kb(proc.pid).items():
                peaks[key] = max(peaks[key], value)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file()) if written else 0
    return {"seconds": time.perf_counter() - started, "peak_anon": peaks["RssAnon"] * 1024,
            "peak_rss": peaks["VmHWM"] * 1024, "written": size, "last_line": (output.strip().splitlines() or [""])[-1]}


COMMANDS = ("import", "expand", "export", "eval-load")


def measure(release: Path, work: Path, commands: tuple[str, ...] = COMMANDS) -> dict[str, dict]:
    """Each command in turn (each needs the ones before it: only a prefix of COMMANDS is run)."""
    cli = [sys.executable, "-m", "ds_upcycle.cli"]
    ckpt, e2x, hf = work / "imported", work / "e2x", work / "hf"
    for path in (ckpt, e2x, hf):
        shutil.rmtree(path, ignore_errors=True)
    runs = {"import": lambda: run_measured([*cli, "import", str(release), str(ckpt)], ckpt),
            "expand -m 2 uniform": lambda: run_measured([*cli, "expand", str(ckpt), str(e2x), "-m", "2", "--select",
                                                         "uniform"], e2x),
            "export bf16": lambda: run_measured([*cli, "export", str(e2x), str(hf), "--dtype", "bfloat16"], hf),
            "eval-load bf16": lambda: run_measured([sys.executable, "-c", EVAL_LOAD, str(e2x)], None)}
    return {name: run() for name, run in list(runs.items())[:len(commands)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.25,1,2", help="release sizes in GB (bf16 weights)")
    parser.add_argument("--commands", default=",".join(COMMANDS),
                        help=f"a prefix of {','.join(COMMANDS)} (each needs the output of the ones before it)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-scale",
                        help="releases are kept here between runs; outputs are removed after each size")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    commands = tuple(args.commands.split(","))
    if commands != COMMANDS[:len(commands)]:
        parser.error(f"--commands must be a prefix of {','.join(COMMANDS)}")
    idle = run_measured([sys.executable, "-c", IDLE], None)
    print(json.dumps({"idle": idle}), flush=True)
    results = {}
    for size in sizes:
        layers = layers_for(size)
        release = build_release(args.workdir / f"release-{layers}-layers", layers)
        release_bytes = sum(p.stat().st_size for p in release.glob("*.safetensors"))
        work = args.workdir / f"out-{layers}-layers"
        results[size] = {"layers": layers, "release_bytes": release_bytes, "runs": measure(release, work, commands)}
        shutil.rmtree(work, ignore_errors=True)
        print(json.dumps({"size_gb": size, **results[size]}), flush=True)

    def gb(n: float) -> str:
        return f"{n / 1e9:.2f}"

    base = idle["peak_anon"]
    print(f"\nidle process (imports only): peak anon {gb(base)} GB, peak RSS {gb(idle['peak_rss'])} GB")
    print("\n| release | non-expert fp32 GB | command | peak anon GB | beyond idle GB | beyond idle / non-expert "
          "| peak RSS GB | seconds | written GB | written / release |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, r in results.items():
        dense = 4 * non_expert_params(r["layers"])
        for name, run in r["runs"].items():
            print(f"| {gb(r['release_bytes'])} GB ({r['layers']} layers) | {gb(dense)} | {name} | "
                  f"{gb(run['peak_anon'])} | {gb(run['peak_anon'] - base)} | {(run['peak_anon'] - base) / dense:.2f} | "
                  f"{gb(run['peak_rss'])} | {run['seconds']:.1f} | {gb(run['written'])} | "
                  f"{run['written'] / r['release_bytes']:.2f} |")
    small, large = results[sizes[0]], results[sizes[-1]]
    print(f"\nlargest / smallest release: {large['release_bytes'] / small['release_bytes']:.1f}x")
    print("| command | peak anon, largest / smallest | beyond idle, largest / smallest | peak RSS, largest / smallest |")
    print("| --- | ---: | ---: | ---: |")
    for name in small["runs"]:
        a, b = small["runs"][name], large["runs"][name]
        print(f"| {name} | {b['peak_anon'] / a['peak_anon']:.2f} | "
              f"{(b['peak_anon'] - base) / max(a['peak_anon'] - base, 1):.2f} | {b['peak_rss'] / a['peak_rss']:.2f} |")


if __name__ == "__main__":
    main()
