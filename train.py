"""Train (or continue training) a DeepSpeed MoE language model, or score its experts.

    deepspeed train.py --deepspeed_config ds_configs/zero2_fp32.json --model tiny --steps 200 --save runs/e4
    deepspeed train.py --deepspeed_config ds_configs/zero2_fp32.json --load runs/e4 --score-experts runs/e4.scores.json

Run `python train.py --help` for every option; README.md walks through a full upcycling run.
"""

import sys
import warnings

from ds_upcycle.accelerator import use_cpu_without_gpu

use_cpu_without_gpu()  # before DeepSpeed is imported
# DeepSpeed's ZeRO calls a collective torch has renamed; the warning is for DeepSpeed, once per process.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)

from ds_upcycle import comm  # noqa: E402
from ds_upcycle.errors import UserError  # noqa: E402
from ds_upcycle.quick_exit import exit_process  # noqa: E402
from ds_upcycle.training.args import configs_from_args, parse_args, score_config_from_args  # noqa: E402
from ds_upcycle.training.loop import read_ds_config, run_training  # noqa: E402
from ds_upcycle.training.scoring import run_scoring  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ds_config = read_ds_config(args.deepspeed_config, args.micro_batch_size, args.grad_accum_steps)
        if args.score_output is not None:
            scores = run_scoring(score_config_from_args(args), ds_config)
            message = (f"scores of {sum(len(r['grad_sq']) for r in scores.layers.values())} experts in "
                       f"{len(scores.layers)} MoE layers written to {args.score_output} "
                       f"({scores.info['seconds']:.1f} s)")
        else:
            train_cfg, data_cfg = configs_from_args(args)
            result = run_training(train_cfg, data_cfg, ds_config, preset=args.model, overrides=args.overrides,
                                  vocab_size=args.vocab_size)
            message = f"validation loss {result.val_loss:.4f} at step {result.step} ({result.tokens:,} tokens)"
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    first_rank = comm.rank() == 0
    comm.shutdown()
    if first_rank:
        print(message)
    return 0


if __name__ == "__main__":
    exit_process(main())
