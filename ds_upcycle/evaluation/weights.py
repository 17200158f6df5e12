"""Load a checkpoint's weights into one single-process model, whatever layout trained it.

Only DeepSpeed's model-state files are read: `mp_rank_00_model_states.pt` (`module`: every
non-expert tensor, router included) and one `layer_{L}_expert_{G}_mp_rank_00_model_states.pt` per
expert, whose keys already name experts by their global id. Those files look the same for any
ZeRO stage, data-parallel size and ep_size, and a model built with ep_size 1 names its experts by
global id too, so the keys match one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..checkpoint.names import expert_file
from ..model import Transformer
from ..training.checkpoint import MODEL_STATES, CheckpointRef, find_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def _load(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises assorted types for damaged or foreign files
        raise UserError(f"cannot read {file}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def read_state_dict(ref: CheckpointRef, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the model, experts keyed by global id, as stored (dtype unchanged)."""
    state = dict(_load(ref.path / MODEL_STATES)["module"])
    files = [expert_file(layer, expert) for layer, count in enumerate(cfg.experts_per_layer) for expert in range(count)]
    missing = [file for file in files if not (ref.path / file).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{ref.path} lacks expert file {missing[0]}{more} "
                        f"(its ds_upcycle.json says {cfg.experts_per_layer} experts in its MoE layers)")
    for file in files:
        state.update(_load(ref.path / file))
    return state


@dataclass
class LoadedCheckpoint:
    model: Transformer
    ref: CheckpointRef
    tokenizer: Path
    run_info: dict

    @property
    def seq_len(self) -> int | None:
        """The training sequence length: the context the model has learnt to use."""
        return self.run_info.get("data", {}).get("seq_len")


def load_checkpoint(path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedCheckpoint:
    """Rebuild the model of a ds-upcycle checkpoint (save dir or tag dir) in eval mode."""
    ref = find_checkpoint(path)
    info = ref.run_info
    cfg = ref.model_config
    if ref.tokenizer is None:
        raise UserError(f"{ref.path} has no tokenizer.model: cannot turn text into its token ids")
    state = read_state_dict(ref, cfg)
    # Built on the meta device: the weights come from the file, so random init would be wasted work.
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches, e.g. ZeRO-3's empty placeholders
        raise UserError(f"{ref.path} does not match its own model config: "
                        f"{' '.join(str(err).split())[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        names = result.missing_keys[:3] or result.unexpected_keys[:3]
        kind = "lacks" if result.missing_keys else "has unknown"
        raise UserError(f"{ref.path} {kind} weights {', '.join(names)}: it does not match its own model config")
    groups = cfg.route_groups or [None] * len(model.routers)
    for router, group in zip(model.routers, groups):  # buffers the checkpoint does not hold
        router.route_load = torch.zeros(router.num_experts)  # balancing counters only matter in training
        if group is not None:  # from the model config
            router.route_group = torch.tensor(group, dtype=torch.long)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # The router keeps its bias in fp32 whatever the dtype (LossFreeRouter._apply).
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedCheckpoint(model, ref, ref.tokenizer, info)
