"""Training throughput, measured side by side in one process and one run.

1. One MoE layer, forward + backward, at the same shape: our loss-free router against DeepSpeed's
   stock TopKGate (dropless, like ours, and with its default capacity factor 1.0, which drops
   tokens). Prints tokens/s of each and the ratio.
2. Whole-model training step through a DeepSpeed engine for an E-expert and a 2E-expert model:
   the per-step times t_E and t_mE of the compute ledger, and their ratio.

    DS_ACCELERATOR=cpu python scripts/bench_train_throughput.py --preset tiny
"""

from __future__ import annotations

import argparse
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


def bench_layers(cfg, tokens: int, device, warmup: int, repeats: int) -> None:
    from deepspeed.moe.layer import MoE

    from ds_upcycle.moe.layer import MoEFeedForward, SwiGLU
    from ds_upcycle.moe.router import LossFreeRouter

    torch.manual_seed(0)
    ours = MoEFeedForward(cfg.dim, cfg.expert_ffn_dim, cfg.num_experts, cfg.top_k,
                          LossFreeRouter(cfg.dim, cfg.num_experts, cfg.top_k)).to(device)
    stock = {
        "stock, dropless": MoE(cfg.dim, SwiGLU(cfg.dim, cfg.expert_ffn_dim), cfg.num_experts, k=cfg.top_k,
                               drop_tokens=False, top2_2nd_expert_sampling=False).to(device),
        "stock, capacity 1.0": MoE(cfg.dim, SwiGLU(cfg.dim, cfg.expert_ffn_dim), cfg.num_experts, k=cfg.top_k,
                                   capacity_factor=1.0, top2_2nd_expert_sampling=False).to(device),
    }
    x = torch.randn(1, tokens, cfg.dim, device=device, requires_grad=True)

    def step(layer):
        def run():
            out = layer(x)[0]
            out.float().square().mean().backward()
        return run

    times = timed({"ours (loss-free)": step(ours), **{name: step(layer) for name, layer in stock.items()}},
                  warmup, repeats)
    base = times["ours (loss-free)"]
    print(f"\nMoE layer: dim {cfg.dim}, expert ffn {cfg.expert_ffn_dim}, {cfg.num_experts} experts, "
          f"top-{cfg.top_k}, {tokens} tokens, forward+backward, median of {repeats}")
    print(f"  {'layer':<22}{'tokens/s':>12}{'speed vs ours':>15}")
    for name, t in times.items():
        print(f"  {name:<22}{tokens / t:>12,.0f}{base / t:>15.3f}")


def bench_models(cfg, batch: int, seq_len: int, warmup: int, repeats: int, bf16: bool) -> None:
    import deepspeed

    from ds_upcycle.model import Transformer

    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": not torch.cuda.is_available()}},
                 "zero_optimization": {"stage": 2}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
    def train_step(experts: int):
        model = Transformer(cfg.replace(num_experts=experts))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=engine.device)

        def step():
            logits, aux = engine(tokens[:, :-1])
            engine.backward(F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + aux)
            engine.step()

        return step

    times = timed({e: train_step(e) for e in (cfg.num_experts, 2 * cfg.num_experts)}, warmup, repeats)
    (e, t_e), (me, t_me) = times.items()
    print(f"\nTraining step ({batch} x {seq_len} tokens, ZeRO-2{', bf16' if bf16 else ''}):")
    print(f"  t_E  ({e:>3} experts) = {t_e * 1000:8.1f} ms   {batch * seq_len / t_e:>10,.0f} tokens/s")
    print(f"  t_mE ({me:>3} experts) = {t_me * 1000:8.1f} ms   {batch * seq_len / t_me:>10,.0f} tokens/s")
    print(f"  t_mE / t_E = {t_me / t_e:.3f}")


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
    bench_layers(cfg, args.batch * args.seq_len, device, args.warmup, args.repeats)
    bench_models(cfg, args.batch, args.seq_len, args.warmup, args.repeats, args.bf16)


if __name__ == "__main__":
    main()
