"""How long a process takes to exit once it has imported what a DeepSpeed engine imports: sys.exit
against ds_upcycle.quick_exit.exit_process, side by side, alternating.

    DS_ACCELERATOR=cpu python scripts/bench_exit.py --repeats 5

Each run is a fresh interpreter that imports torch, DeepSpeed and torch's compiler stack (torch._dynamo,
which torch.optim imports, and the module DeepSpeed's ZeRO check imports, which pulls in
torch._inductor), prints the time, and exits; the figure is the time from that print to the
process's end as its parent sees it.
"""

import argparse
import statistics
import subprocess
import sys
import time

CHILD = """
import time, torch, deepspeed, torch._dynamo
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
from ds_upcycle.quick_exit import exit_process
print(time.time(), flush=True)
{exit}
"""
WAYS = {"sys.exit": "import sys; sys.exit(0)", "exit_process": "exit_process(0)"}


def exit_seconds(way: str) -> float:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(exit=WAYS[way])], capture_output=True, text=True,
                          check=True)
    return time.time() - float(proc.stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            times[way].append(exit_seconds(way))
    for way, values in times.items():
        print(f"{way:13s} exit {statistics.median(values):.2f} s (median of {len(values)}: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    print(f"exit_process / sys.exit: {statistics.median(times['exit_process']) / statistics.median(times['sys.exit']):.2f}")


if __name__ == "__main__":
    main()
