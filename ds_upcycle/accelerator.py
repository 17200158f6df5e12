"""DeepSpeed's accelerator chosen before DeepSpeed is imported: the CPU where no GPU is visible.

DeepSpeed picks the CPU by itself on such a machine, but announces it with a warning on every
import ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
it."), once per process of a launch. The entry points (train.py, the ds-upcycle command) call
`use_cpu_without_gpu` first; an explicit DS_ACCELERATOR is kept.
"""

from __future__ import annotations

import os

import torch


def use_cpu_without_gpu() -> None:
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
