"""The user's opt-in to reading checkpoints whose pickles hold classes outside the allowlist.

Off by default: checkpoint files are read with torch's safe loader (checkpoint/files.py). The
`--trust-checkpoints` flags set it for the process and every process it starts (train.py runs of
`reproduce`, evaluation workers) through one environment variable.
"""

from __future__ import annotations

import os

TRUST_ENV = "DS_UPCYCLE_TRUST_CHECKPOINTS"


def trusting() -> bool:
    """Whether the user vouched for the checkpoints this process reads."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def trust_checkpoints() -> None:
    """Opt in for this process and the processes it starts."""
    os.environ[TRUST_ENV] = "1"
