"""DeepSpeed checkpoint I/O: read any MoE layout (no ZeRO, ZeRO-1 or 2) into full state, write it for any layout.

Knows DeepSpeed's file layout and partitioning rules, nothing of upcycling: a caller reads a
checkpoint (`read_checkpoint`), transforms the layout-independent state, and writes it for the
target data-parallel size and ep_size (`write_checkpoint`).
"""

from .reader import CheckpointReader, read_checkpoint
from .state import (CheckpointMeta, CheckpointSource, CheckpointState, MoELayer, NonExpertState, ParamGroup,
                    ParamState, load_state, named_param_states)
from .writer import write_checkpoint

__all__ = ["CheckpointMeta", "CheckpointReader", "CheckpointSource", "CheckpointState", "MoELayer",
           "NonExpertState", "ParamGroup", "ParamState", "load_state", "named_param_states", "read_checkpoint",
           "write_checkpoint"]
