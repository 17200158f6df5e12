"""DeepSpeed's accelerator chosen before DeepSpeed is imported: the CPU where no GPU is visible.

DeepSpeed picks the CPU by itself on such a machine, but announces it with a warning on every
import ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
it."), once per process of a launch. train.py calls `use_cpu_without_gpu` first; every ds-upcycle
command is wrapped in `chooses_accelerator` (its body imports the libraries it calls). An explicit DS_ACCELERATOR is kept.
"""

from __future__ import annotations

import functools
import os
from typing import Callable


def use_cpu_without_gpu() -> None:
    # torch is imported here, when work starts, so that `ds-upcycle --help` does not pay its seconds.
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def chooses_accelerator(command: Callable) -> Callable:
    """Run `use_cpu_without_gpu` before a command body (which imports the libraries it calls)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        use_cpu_without_gpu()
        return command(*args, **kwargs)

    return run
