"""DeepSpeed checkpoint files: locate, read any MoE layout (no ZeRO, ZeRO-1 or 2) into full state, write any layout.

The lowest layer that knows files. It knows DeepSpeed's file layout and partitioning rules and
the run record ds-upcycle keeps beside them (run_record.py, metrics.py), and nothing of the model's
maths or of upcycling: a caller reads a checkpoint (`read_checkpoint`), transforms the
layout-independent state, and writes it for the target data-parallel size and ep_size
(`write_checkpoint`).
"""

from .autoep import autoep_score_func
from .files import check_checkpoint_dir
from .fresh import MODULE_ONLY_CONFIG, module_state
from .mapped import ScratchFiles
from .metrics import MetricsLog, read_metrics
from .model_file import read_module_weights
from .progress import ProgressSource
from .reader import read_checkpoint
from .run_record import (RUN_FILE, CheckpointRef, ImportOrigin, RunRecord, find_checkpoint, latest_checkpoint,
                         write_run_files)
from .state import (CheckpointMeta, CheckpointReader, CheckpointSource, CheckpointState, MoELayer, NonExpertState,
                    ParamGroup, ParamState, load_state, named_param_states)
from .writer import write_checkpoint

__all__ = ["MODULE_ONLY_CONFIG", "RUN_FILE", "CheckpointMeta", "CheckpointReader", "CheckpointRef", "CheckpointSource",
           "CheckpointState", "autoep_score_func", "check_checkpoint_dir",
           "ImportOrigin", "MetricsLog", "MoELayer", "NonExpertState", "ParamGroup", "ParamState", "ProgressSource", "RunRecord", "ScratchFiles",
           "find_checkpoint", "latest_checkpoint", "load_state", "module_state", "named_param_states",
           "read_checkpoint", "read_metrics", "read_module_weights", "write_checkpoint", "write_run_files"]
