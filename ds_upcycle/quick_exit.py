"""Ending a process without the interpreter's final garbage collections.

A process that has built a DeepSpeed engine has imported torch's compiler stack (torch.optim imports
torch._dynamo when it takes parameters; DeepSpeed's ZeRO check imports torch._inductor), and the
interpreter's teardown then collects over every object those imports made: about 2 s a process
(`scripts/bench_exit.py`, 2 CPU cores: median 2.06 s with sys.exit, 0.26 s with exit_process).
Frozen, they are left to the operating system like the rest of the process's memory. Nothing else
changes: atexit handlers run, the standard streams are flushed, objects freed by reference counting
are finalised as before. Only objects kept alive by reference cycles alone are not finalised, and
ds-upcycle closes its files with `with` blocks.
"""

import gc
import sys
from typing import NoReturn


def exit_process(status: int | str | None = 0) -> NoReturn:
    """sys.exit(status), its teardown without the final collections; for a script's last line only
    (never inside a library call: the caller's process would stop collecting cycles)."""
    gc.freeze()
    sys.exit(status)
