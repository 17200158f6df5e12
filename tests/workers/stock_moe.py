"""A plain DeepSpeed MoE script, not ds-upcycle's model: two stock MoE layers with the stock gate.

    train: stock_moe.py --config ds.json --experts 4 --ep-size 1 --steps 3 --save DIR
    resume: stock_moe.py --config ds.json --experts 8 --ep-size 1 --steps 1 --load DIR --report out.json

With --load it loads the checkpoint with stock engine.load_checkpoint, then trains --steps more.
--report FILE writes, per rank (FILE.rank<r>), every parameter's full fp32 weight and Adam moments
as DeepSpeed's own accessors see them, expert names with global ids: the oracle for checkpoint tests.
It reports what was loaded, before any further step; without --load, the state it trained (and saved).
"""

import argparse
import json
import re

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from torch import nn

from ds_upcycle import comm
from ds_upcycle.quick_exit import exit_process


class Expert(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, dim, experts, ep_size):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.moe1 = MoE(dim, Expert(dim), experts, ep_size=ep_size, k=2, use_rts=False,
                        top2_2nd_expert_sampling=False)
        self.moe2 = MoE(dim, Expert(dim), experts, ep_size=ep_size, k=1, use_rts=False)
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.moe1(x)[0]
        x = x + self.moe2(x)[0]
        return self.out(x)


def report(engine, num_local, ep_rank, path):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    # deepspeed 0.19.8 links the optimizer-state fragments of every group after the first step, while
    # only the first group has state: safe_get_full_optimizer_state then fails on expert parameters
    # ("exp_avg not found") until they are linked again.
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, param in engine.module.named_parameters():
        name = re.sub(r"deepspeed_experts\.(\d+)\.",
                      lambda m: f"deepspeed_experts.{ep_rank * num_local + int(m.group(1))}.", name)
        out[name] = {"fp32": safe_get_full_fp32_param(param).tolist(),
                     "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").tolist(),
                     "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").tolist()}
    json.dump(out, open(path, "w"))


def report_ranks(engine, args):
    rank = engine.global_rank
    report(engine, args.experts // args.ep_size, rank % args.ep_size, f"{args.report}.rank{rank}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("--config", required=True)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--save")
    p.add_argument("--load")
    p.add_argument("--report")
    args = p.parse_args()
    comm.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Net(16, args.experts, args.ep_size)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=json.load(open(args.config)))
    if args.load:
        path, _ = engine.load_checkpoint(args.load)
        assert path is not None, "nothing loaded"
    if args.report and args.load:  # what was loaded, before any further step
        report_ranks(engine, args)
    gen = torch.Generator().manual_seed(100 + engine.global_rank)
    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        x = torch.randn(4, 8, 16, generator=gen)
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
    if args.save:
        engine.save_checkpoint(args.save)
    if args.report and not args.load:
        report_ranks(engine, args)
    print(f"rank {engine.global_rank} steps {engine.global_steps} loss {loss.item():.6f}")
    comm.shutdown()


if __name__ == "__main__":
    main()
    exit_process()  # the test's plumbing: no 2 s of teardown collections (ds_upcycle.quick_exit)
