"""DeepSpeed's model-states file (`mp_rank_00_model_states.pt`) and the per-expert weight files.

What every format's reader shares: which model-file entries are DeepSpeed's own (everything else
is client state), the checks that refuse what no reader supports, the metadata common to all
formats, and the module weights (non-expert from the model file, experts from their own files),
which look the same for every ZeRO stage, data-parallel size and ep_size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.checkpoint.constants import DS_VERSION
from tqdm import tqdm

from ..data.tokenizer import find_tokenizer
from ..errors import UserError
from .ds_config import zero_stage
from .files import load_file
from .names import MODEL_FILE, MODEL_STATES, ZERO3_MODEL_FILE, ZERO_FILE, expert_file, split_expert_param
from .run_record import RUN_FILE, read_run_record

# Model-file entries the writer recomputes for the target layout or takes from CheckpointMeta.
RECOMPUTED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "shared_params", "lr_scheduler",
                   "skipped_steps", "global_steps", "global_samples", "dp_world_size", "ds_config", "ds_version",
                   "num_experts", "frozen_param_shapes", "frozen_param_fragments", "ds_autoep_layers"}
# Other entries DeepSpeed itself writes; everything else in the model file is client state.
DEEPSPEED_KEYS = RECOMPUTED_KEYS | {"data_sampler", "random_ltd", "mp_world_size", "checkpoint_parallel_dimensions",
                                    "universal_checkpoint_info", "autoep_layers"}


def open_model_file(tag_dir: Path) -> dict:
    """The model-states file of a tag directory, memory-mapped, after the checks every format needs."""
    model = load_file(tag_dir / MODEL_STATES, mmap=True)
    _check_model_file(model, tag_dir / MODEL_STATES)
    return model


def common_meta(model: dict, tag_dir: Path) -> dict:
    """CheckpointMeta fields that every format reads the same way from its model file."""
    tokenizer = find_tokenizer(tag_dir)
    return dict(
        global_steps=model["global_steps"], global_samples=model.get("global_samples", 0),
        skipped_steps=model.get("skipped_steps", 0), lr_scheduler=model.get("lr_scheduler"),
        client_state={k: v for k, v in model.items() if k not in DEEPSPEED_KEYS},
        ds_config=model["ds_config"], ds_version=model[DS_VERSION],
        model_extras={k: model[k] for k in DEEPSPEED_KEYS - RECOMPUTED_KEYS if k in model},
        run_record=read_run_record(tag_dir / RUN_FILE), tokenizer=tokenizer,
        source=tag_dir)


def check_module_keys(keys: list[str], params: list[str], buffers: list[str], shared: dict[str, str],
                      tag_dir: Path) -> None:
    """The module state_dict must hold exactly the optimizer's parameters, the buffers and the tied names."""
    expert_buffers = [b for b in buffers if split_expert_param(b) is not None]
    if expert_buffers:
        raise UserError(f"{tag_dir}: buffers inside experts ({expert_buffers[0]}) are not supported")
    expected = set(params) | set(buffers) | set(shared)
    unknown, missing = set(keys) - expected, expected - set(keys)
    if unknown or missing:
        example = min(unknown or missing)
        raise UserError(f"{tag_dir}: module weights do not match the optimizer's parameters "
                        f"({'unexpected' if unknown else 'missing'} {example})")


def agreed_step(steps: list, where: Path | str) -> torch.Tensor | None:
    """The Adam step count every optimizer state agrees on; None before the first step."""
    if all(s is None for s in steps):
        return None
    values = {float(s) for s in steps if s is not None}
    if len(values) != 1 or any(s is None for s in steps):
        raise UserError(f"{where}: optimizer states disagree on the Adam step count ({sorted(values)})")
    step = steps[0]
    return step.clone() if torch.is_tensor(step) else torch.tensor(float(step))


def read_module_weights(tag_dir: Path, mmap: bool = False, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every module tensor as stored (dtype unchanged), experts keyed by their global id.

    Only the module weights are read (no optimizer state), with the safe loader (files.py). With
    mmap the tensors stay in their files (the page cache) until read. `progress` shows a bar over
    the expert files (a 64-expert, 16-layer model has 1,024 of them).
    """
    model = load_file(tag_dir / MODEL_STATES, mmap=mmap)
    state = dict(model["module"])
    counts = model.get("num_experts") or []
    files = [expert_file(layer, expert) for layer, count in enumerate(counts) for expert in range(count)]
    missing = [file for file in files if not (tag_dir / file).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{tag_dir} lacks expert file {missing[0]}{more} "
                        f"(its model file says {counts} experts in its MoE layers)")
    for file in tqdm(files, desc=f"reading {tag_dir.name}", unit="expert", leave=False, disable=not progress,
                     dynamic_ncols=True):
        state.update(load_file(tag_dir / file, mmap=mmap))
    return state


def refuse_unsupported_files(path: Path) -> None:
    """Name the unsupported checkpoint kinds before the generic 'not a checkpoint' check."""
    latest = path / "latest"
    tag_dir = path / latest.read_text().strip() if latest.is_file() else path
    if not tag_dir.is_dir():
        return
    names = [p.name for p in tag_dir.iterdir()]
    if any(ZERO3_MODEL_FILE.match(n) for n in names):
        raise UserError(f"{tag_dir} is a ZeRO-3 checkpoint; only ZeRO stage 1 and 2 checkpoints are supported")
    mp_ranks = {int(m["mp"]) for n in names if (m := MODEL_FILE.match(n) or ZERO_FILE.match(n))}
    if mp_ranks - {0}:
        raise UserError(f"{tag_dir} has tensor/expert-tensor-parallel shards (mp_rank {max(mp_ranks):02d}); "
                        f"only checkpoints without tensor parallelism are supported")


def _check_model_file(model: dict, path: Path) -> None:
    if not isinstance(model, dict) or not {"module", DS_VERSION, "dp_world_size"} <= set(model):
        raise UserError(f"{path} is not a DeepSpeed model-states file")
    stage = zero_stage(model.get("ds_config"))
    if stage == 3:
        raise UserError(f"{path.parent} is a ZeRO-3 checkpoint; only ZeRO stage 1 and 2 checkpoints are supported")
    if (stage == 0) != (model.get("param_shapes") is None):
        raise UserError(f"{path} does not match its ZeRO stage {stage} (parameter shapes "
                        f"{'missing' if model.get('param_shapes') is None else 'present'})")
    if (model.get("ds_config") or {}).get("zero_optimization", {}).get("round_robin_gradients"):
        raise UserError(f"{path.parent} was saved with zero_optimization.round_robin_gradients, which is not "
                        f"supported")
    dims = model.get("checkpoint_parallel_dimensions") or {}
    if model.get("mp_world_size", 1) != 1 or dims.get("tp_degree", 1) != 1 or dims.get("pp_degree", 1) != 1:
        raise UserError(f"{path.parent} uses tensor or pipeline parallelism (mp_world_size "
                        f"{model.get('mp_world_size')}); only data and expert parallelism are supported")
    if model.get("autoep_layers") and not model.get("ds_autoep_layers"):
        raise UserError(f"{path.parent} describes its AutoEP layers in the older `autoep_layers` entry; save it "
                        f"again with DeepSpeed 0.19.8 or newer")
    if model.get("frozen_param_shapes"):
        raise UserError(f"{path.parent} has frozen parameters ({next(iter(model['frozen_param_shapes']))}, ...), "
                        f"which are not supported")
