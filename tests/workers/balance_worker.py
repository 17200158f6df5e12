"""Launched on 2 ranks: each router counts a different load; the bias update must use their sum."""

import argparse
import json

import torch

from ds_upcycle import comm
from ds_upcycle.moe.balance import balance_routers
from ds_upcycle.moe.router import LossFreeRouter

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int)
parser.add_argument("out")
args = parser.parse_args()
comm.init_distributed(dist_backend="gloo")
rank = comm.rank()
router = LossFreeRouter(8, 4, 2)
router.route_load.copy_(torch.tensor([[5.0, 0.0, 1.0, 2.0], [0.0, 1.0, 1.0, 6.0]])[rank])
stats = balance_routers([router], 0.25, comm.sum_over_world)
if rank == 0:
    with open(args.out, "w") as f:
        json.dump({"bias": router.route_bias.tolist(), "stats": stats}, f)
# Leave together: a rank that exits while its peer still talks to it can abort the peer.
comm.barrier()
torch.distributed.destroy_process_group()
