"""Open a DeepSpeed MoE checkpoint with the reader of its format.

Each format has one reader module (zero_reader.py: ZeRO stage 1 and 2; stage0.py: no ZeRO) that
implements the CheckpointReader protocol of state.py; the readers share model_file.py and never
import each other. A new format (ZeRO-3, say) is a new reader module and one line here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .ds_config import zero_stage
from .model_file import open_model_file, refuse_unsupported_files
from .run_record import find_checkpoint
from .stage0 import Stage0Reader
from .state import CheckpointReader
from .zero_reader import ZeroReader


def read_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a checkpoint: a save directory with `latest`, or a tag directory; ZeRO stage 0, 1 or 2."""
    refuse_unsupported_files(Path(path))
    tag_dir = find_checkpoint(path).path
    model = open_model_file(tag_dir)
    reader = Stage0Reader if zero_stage(model.get("ds_config")) == 0 else ZeroReader
    return reader(tag_dir, model)
