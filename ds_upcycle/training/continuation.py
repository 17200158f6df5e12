"""What a stage started from a checkpoint takes from the command line, and what it cannot take.

Loading a checkpoint restores DeepSpeed's state: weights, optimizer state with each parameter
group's hyperparameters, the LR schedule and the client state. Left alone, that state would
silently override what the user asked for. The rule here: the command line (and the DeepSpeed
config) wins wherever the run can follow it; where it cannot (weight shapes, the tokenizer the
model was trained on) the run is refused, or the flag is named as ignored, in one line.
"""

from __future__ import annotations

import os

from .. import comm
from ..config import ModelConfig
from ..errors import UserError

# Model fields that set the shape of a weight: a checkpoint's weights cannot take another value.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_size", "qk_norm", "dense_ffn_dim",
                "expert_ffn_dim",
                "num_experts", "layer_experts", "moe_layer_freq", "tie_embeddings")

SCHEDULE_FLAGS = {"total": "--steps", "warmup": "--warmup-steps", "decay_fraction": "--decay-fraction",
                  "min_ratio": "--min-lr-ratio", "peak_lrs": "optimizer lr (--deepspeed_config)"}

# Parameter-group keys that are not hyperparameters: the tensors, and the LR the schedule sets.
_NOT_HYPERPARAMETERS = ("params", "lr", "initial_lr")


def note(message: str) -> None:
    """One line on rank 0 (before torch.distributed starts, the launcher's RANK says which that is)."""
    first = comm.rank() == 0 if comm.is_distributed() else os.environ.get("RANK", "0") == "0"
    if first:
        print(f"note: {message}", flush=True)


def check_model_overrides(checkpoint: ModelConfig, overrides: dict, path) -> None:
    """Refuse `--set` values that the checkpoint's weights cannot take (other fields apply)."""
    for name, value in overrides.items():
        old = getattr(checkpoint, name, None)
        if name == "moe_dispatch" and value != old and "autoep" in (value, old):
            raise UserError(f"--set moe_dispatch={value} does not fit checkpoint {path}, whose experts are in the "
                            f"{'AutoEP (stacked)' if old == 'autoep' else 'legacy (per-expert)'} layout of "
                            f"moe_dispatch={old}; the two name their weights differently")
        if name in SHAPE_FIELDS and value != getattr(checkpoint, name):
            hint = "; grow experts with ds-upcycle expand" if name in ("num_experts", "layer_experts") else ""
            raise UserError(f"--set {name}={value} does not fit checkpoint {path}, whose weights have "
                            f"{name} {getattr(checkpoint, name)}{hint}")


def hyperparameters(optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (betas, eps, weight_decay, ...), LR excluded."""
    return [{k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS} for group in optimizer.param_groups]


def reapply_hyperparameters(optimizer, wanted: list[dict]) -> list[str]:
    """Put back the hyperparameters the DeepSpeed config built, which loading a checkpoint replaced.

    Returns one line per changed key, naming the value in force and the checkpoint's.
    """
    changes = {}
    for group, values in zip(optimizer.param_groups, wanted):
        for key, value in values.items():
            if _plain(group.get(key)) != _plain(value):
                changes.setdefault(key, (value, group.get(key)))
            group[key] = value
    return [f"optimizer {key} {_show(new)} (--deepspeed_config) replaces the checkpoint's {_show(old)}"
            for key, (new, old) in changes.items()]


def schedule_changes(restored: dict, wanted: dict, step: int) -> list[str]:
    """Lines for the settings a resumed stage changes from those it was saved with."""
    return [f"{SCHEDULE_FLAGS[key]} {_show(wanted[key])} applies from step {step} "
            f"(the run was saved with {_show(restored[key])})"
            for key in SCHEDULE_FLAGS if restored[key] != wanted[key]]


def run_changes(recorded: dict, current: dict, flags: dict[str, str], step: int) -> list[str]:
    """Lines for the run settings (seed, batch, data) a resumed run changes from its record."""
    return [f"{flags[key]} {_show(current[key])} applies from step {step} "
            f"(the run was saved with {_show(recorded[key])})"
            for key in flags if key in recorded and recorded[key] != current[key]]


def _plain(value):
    """Lists and tuples compare equal (a config gives betas as a list, torch as a tuple)."""
    return list(value) if isinstance(value, tuple) else value


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
