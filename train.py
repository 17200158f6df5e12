"""Train (or continue training) a DeepSpeed MoE language model.

    deepspeed train.py --deepspeed_config ds_configs/zero2_fp32.json --model tiny --steps 200 --save runs/e4

Run `python train.py --help` for every option; README.md walks through a full upcycling run.
"""

import sys

from ds_upcycle import comm
from ds_upcycle.errors import UserError
from ds_upcycle.training.args import configs_from_args
from ds_upcycle.training.loop import read_ds_config, run_training


def main(argv=None) -> int:
    try:
        train_cfg, data_cfg, args = configs_from_args(argv)
        ds_config = read_ds_config(args.deepspeed_config, args.micro_batch_size, args.grad_accum_steps)
        result = run_training(train_cfg, data_cfg, ds_config, preset=args.model, overrides=args.overrides,
                              vocab_size=args.vocab_size)
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    first_rank = comm.rank() == 0
    comm.shutdown()
    if first_rank:
        print(f"validation loss {result.val_loss:.4f} at step {result.step} ({result.tokens:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
