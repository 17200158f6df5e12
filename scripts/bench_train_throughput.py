"""Training throughput, measured side by side in one process and one run.

1. One MoE layer, forward + backward, at the same shape: our loss-free router on DeepSpeed's legacy
   MOELayer and on DeepSpeed AutoEP's layer (moe_dispatch=autoep: stacked experts, AutoEP's own
   dispatch and grouped GEMM, the same weights) against DeepSpeed's stock TopKGate (dropless, like
   ours, and with its default capacity factor 1.0, which drops tokens). Prints tokens/s of each and
   the ratio.
2. Whole-model training step through a DeepSpeed engine for an E-expert and a 2E-expert model, with
   each dispatch (--dispatches): the per-step times t_E and t_mE of the compute ledger, and their
   ratio.

    DS_ACCELERATOR=cpu python scripts/bench_train_throughput.py --preset tiny
    python scripts/bench_train_throughput.py --preset paper-il8 --batch 32 --seq-len 512 --bf16 --profile

--json FILE also writes every figure as JSON; --profile adds a torch.profiler table of the
kernels each MoE layer runs (forward + backward), to say where one layer loses to another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fns: dict, warmup: int, repeats: int) -> dict:
    """Median seconds of each fn(), measured in alternation so that drift hits all alike."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            acc.synchronize()
            start = time.perf_counter()
            fn()
            acc.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def profile_layers(steps: dict, device, rows: int = 12) -> None:
    """The kernels (or CPU ops) that take each layer's time, over 3 forward + backward passes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, run in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(3):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\nprofile: {name} (3 passes)")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def bench_layers(cfg, tokens: int, device, dtype, warmup: int, repeats: int, profile: bool = False) -> dict:
    from deepspeed.moe.layer import MoE

    from ds_upcycle.moe.layer import MoEFeedForward, SwiGLU
    from ds_upcycle.moe.router import LossFreeRouter

    torch.manual_seed(0)
    ours = MoEFeedForward(cfg.dim, cfg.expert_ffn_dim, cfg.num_experts, cfg.top_k,
                          LossFreeRouter(cfg.dim, cfg.num_experts, cfg.top_k, cfg.score_func)).to(device, dtype)
    autoep = autoep_layer(cfg, ours, device, dtype)  # the same weights: the same routing and function
    stock = {
        "stock, dropless": MoE(cfg.dim, SwiGLU(cfg.dim, cfg.expert_ffn_dim), cfg.num_experts, k=cfg.top_k,
                               drop_tokens=False, top2_2nd_expert_sampling=False).to(device, dtype),
        "stock, capacity 1.0": MoE(cfg.dim, SwiGLU(cfg.dim, cfg.expert_ffn_dim), cfg.num_experts, k=cfg.top_k,
                                   capacity_factor=1.0, top2_2nd_expert_sampling=False).to(device, dtype),
    }
    x = torch.randn(1, tokens, cfg.dim, device=device, dtype=dtype, requires_grad=True)

    def step(layer):
        def run():
            out = layer(x)[0]
            out.float().square().mean().backward()
        return run

    def autoep_step():
        autoep(x).float().square().mean().backward()   # AutoEP's layer returns the output alone

    steps = {"ours (loss-free)": step(ours), "ours, AutoEP": autoep_step,
             **{name: step(layer) for name, layer in stock.items()}}
    times = timed(steps, warmup, repeats)
    base = times["ours (loss-free)"]
    print(f"\nMoE layer: dim {cfg.dim}, expert ffn {cfg.expert_ffn_dim}, {cfg.num_experts} experts, "
          f"top-{cfg.top_k}, {tokens} tokens, {str(dtype).removeprefix('torch.')}, forward+backward, "
          f"median of {repeats}")
    print(f"  {'layer':<22}{'tokens/s':>12}{'speed vs ours':>15}")
    for name, t in times.items():
        print(f"  {name:<22}{tokens / t:>12,.0f}{base / t:>15.3f}")
    if profile:
        profile_layers(steps, device)
    return {name: {"seconds": t, "tokens_per_s": tokens / t, "speed_vs_ours": base / t} for name, t in times.items()}


def autoep_layer(cfg, legacy, device, dtype):
    """DeepSpeed AutoEP's layer with `legacy`'s weights: a stacked block (moe_dispatch=autoep), in a
    module at the path AutoEP's patterns name, replaced by AutoEP at deepspeed.initialize."""
    import deepspeed
    from torch import nn

    from ds_upcycle.moe.stacked import StackedFeedForward, autoep_section

    block = nn.Module()
    block.ffn = StackedFeedForward(cfg.dim, cfg.expert_ffn_dim, cfg.num_experts, cfg.top_k, cfg.score_func,
                                   cfg.normalize_routes)
    holder = nn.Module()
    holder.layers = nn.ModuleList([block])
    moe = block.ffn.moe
    with torch.no_grad():
        moe.router.gate.weight.copy_(legacy.router.wg.weight)
        for stacked, name in ((moe.experts.w1, "w_gate"), (moe.experts.w2, "w_down"), (moe.experts.w3, "w_up")):
            stacked.copy_(torch.stack([getattr(e, name).weight for e in legacy.local_experts]))
    holder.to(device, dtype)
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": dtype == torch.bfloat16},
              "expert_parallel": autoep_section(cfg.top_k, cfg.score_func, cfg.normalize_routes, 1)}
    deepspeed.initialize(model=holder, model_parameters=holder.parameters(), config=config)
    return holder.layers[0].ffn.moe


def bench_models(cfg, batch: int, seq_len: int, warmup: int, repeats: int, bf16: bool,
                 dispatches: list[str]) -> dict:
    import deepspeed

    from ds_upcycle.model import Transformer
    from ds_upcycle.training.loop import engine_config

    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": not torch.cuda.is_available()}},
                 "zero_optimization": {"stage": 2}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
    engines = []  # kept alive until every step is timed

    def train_step(experts: int, dispatch: str):
        model_cfg = cfg.replace(num_experts=experts, moe_dispatch=dispatch)
        model = Transformer(model_cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=engine_config(ds_config, model_cfg, 1))
        engines.append(engine)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=engine.device)

        def step():
            logits, aux = engine(tokens[:, :-1])
            engine.backward(F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + aux)
            engine.step()

        return step

    e, me = cfg.num_experts, 2 * cfg.num_experts
    times = timed({(d, n): train_step(n, d) for d in dispatches for n in (e, me)}, warmup, repeats)
    print(f"\nTraining step ({batch} x {seq_len} tokens, ZeRO-2{', bf16' if bf16 else ''}):")
    figures = {"experts": [e, me], "tokens_per_step": batch * seq_len}
    for d in dispatches:
        t_e, t_me = times[(d, e)], times[(d, me)]
        print(f"  {d:<8} t_E  ({e:>3} experts) = {t_e * 1000:8.1f} ms   {batch * seq_len / t_e:>10,.0f} tokens/s")
        print(f"  {d:<8} t_mE ({me:>3} experts) = {t_me * 1000:8.1f} ms   {batch * seq_len / t_me:>10,.0f} tokens/s")
        print(f"  {d:<8} t_mE / t_E = {t_me / t_e:.3f}")
        figures[d] = {"t_E_ms": t_e * 1000, "t_mE_ms": t_me * 1000, "ratio": t_me / t_e}
    first = dispatches[0]
    for other in dispatches[1:]:
        print(f"  {other} / {first} step time: t_E {times[(other, e)] / times[(first, e)]:.3f}, "
              f"t_mE {times[(other, me)] / times[(first, me)]:.3f}")
    if torch.cuda.is_available():
        figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"  peak GPU memory (both engines) = {figures['peak_gpu_memory_gib']:.1f} GiB")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--layer-tokens", type=int, default=None,
                        help="tokens per layer call (default batch x seq-len)")
    parser.add_argument("--skip-models", action="store_true", help="time the MoE layers only")
    parser.add_argument("--dispatches", default="legacy,autoep", help="moe_dispatch values of the training steps")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per MoE layer")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import deepspeed

    from ds_upcycle import comm
    from ds_upcycle.config import resolve_model_config

    comm.single_process_env()
    comm.init_distributed()
    cfg = resolve_model_config(args.preset, args.overrides).replace(vocab_size=args.vocab_size)
    device = torch.device(deepspeed.accelerator.get_accelerator().device_name(0)
                          if torch.cuda.is_available() else "cpu")
    print(f"device: {device}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
          f"threads {torch.get_num_threads()}")
    figures = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "deepspeed": deepspeed.__version__, "model": cfg.to_dict(),
               "layer_tokens": args.layer_tokens or args.batch * args.seq_len}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    figures["layers"] = bench_layers(cfg, figures["layer_tokens"], device, dtype, args.warmup, args.repeats,
                                     args.profile)
    if not args.skip_models:
        figures["steps"] = bench_models(cfg, args.batch, args.seq_len, args.warmup, args.repeats, args.bf16,
                                        args.dispatches.split(","))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
