"""Both MoE dispatches on the same weights and tokens under expert parallelism (launched with
N processes and --ep-size P): each rank writes OUT.rank<r>.pt with, per dispatch, the logits, the
auxiliary loss, every parameter's gradient (by layout-independent name) and the routers' load counts.

The grouped dispatch's rows cross ranks in a variable-size all-to-all; the legacy one, DeepSpeed's
MOELayer, is the oracle."""

import argparse

import deepspeed
import torch
import torch.nn.functional as F

from ds_upcycle import comm
from ds_upcycle.config import ModelConfig
from ds_upcycle.model import Transformer

SMALL = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=48,
                    expert_ffn_dim=24, num_experts=8, top_k=2, moe_layer_freq=2, aux_loss_coef=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("out")
    args = parser.parse_args()
    comm.single_process_env()
    comm.init_distributed(dist_backend="gloo")
    rank = comm.rank()
    # Each rank its own tokens, some ranks more than others: the all-to-all's splits are uneven.
    tokens = torch.randint(0, 97, (2 + rank, 13), generator=torch.Generator().manual_seed(rank))
    results = {}
    for dispatch in ("legacy", "grouped"):
        model = Transformer(SMALL.replace(moe_dispatch=dispatch), ep_size=args.ep_size,
                            ep_rank=rank % args.ep_size, seed=3).train()
        engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1})
        logits, aux = engine.module(tokens[:, :-1])
        (F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + aux).backward()
        names = model.global_param_names()
        results[dispatch] = {"logits": logits.detach(), "aux": aux.detach(),
                             "grads": {names[n]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                             "loads": [r.route_load.clone() for r in model.routers]}
    torch.save(results, f"{args.out}.rank{rank}.pt")
    comm.shutdown()


if __name__ == "__main__":
    main()
