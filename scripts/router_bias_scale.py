"""Warm-start jump of `expand -m 2` on a softmax-router checkpoint: the routing bias multiplied by E/N
(what expand does) against copied unscaled (the scale forced to 1, which no option offers).

    DS_ACCELERATOR=cpu python scripts/router_bias_scale.py SOURCE OUT_DIR [--data-cache DIR]

Prints one JSON line per expansion (uniform and grad_sq, plain and --distinct-copies).
"""

import argparse
import json

import ds_upcycle.upcycle.expand as expand_module
from ds_upcycle.upcycle.config import ExpandConfig
from ds_upcycle.upcycle.expand import expand_checkpoint
from ds_upcycle.upcycle.operator import route_bias_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--data-cache", default=None)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    for select in ("uniform", "grad_sq"):
        for distinct in (False, True):
            for scaled in (True, False):
                expand_module.route_bias_scale = route_bias_scale if scaled else (lambda plan, score_func: 1.0)
                name = f"{select}-{'distinct' if distinct else 'plain'}-{'scaled' if scaled else 'unscaled'}"
                cfg = ExpandConfig(args.source, f"{args.out}/{name}", multiplier=2, select=select,
                                   distinct_copies=distinct, router_noise=0.0 if distinct else 0.01, check_data=True,
                                   check_samples=args.samples, data_cache=args.data_cache, force=True)
                result = expand_checkpoint(cfg, progress=False)
                print(json.dumps({"expansion": name, **result.warm_start.to_dict()}), flush=True)


if __name__ == "__main__":
    main()
