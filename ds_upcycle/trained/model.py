"""The one whole-model loader: a checkpoint's model in one process, whatever layout trained it.

`load_model` reads DeepSpeed's module weights only (checkpoint.read_module_weights: the model
file's non-expert tensors and one file per expert, experts named by global id), which look the same
for any ZeRO stage, data-parallel size and ep_size; a model built with ep_size 1 names its experts
by global id too, so the keys match one to one. `load_master_model` puts the fp32 master weights of
the optimizer state in their place (what training continues from), through a checkpoint reader.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import (CheckpointReader, CheckpointRef, RunRecord, find_checkpoint, named_param_states,
                          read_module_weights)
from ..errors import UserError
from ..model import Transformer
from ..moe.live import set_routing_groups, zero_load_counters
from ..moe.stacked import stack_expert_slices


@dataclass
class LoadedModel:
    model: Transformer
    ref: CheckpointRef
    tokenizer: Path
    record: RunRecord

    @property
    def seq_len(self) -> int | None:
        """The training sequence length: the context the model has learnt to use."""
        return self.record.seq_len


def load_model(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
               progress: bool = False) -> LoadedModel:
    """Rebuild the model of a ds-upcycle checkpoint (save dir or tag dir) in eval mode, in `dtype`
    (None: as stored).

    The files are memory-mapped: a tensor already in `dtype` on the CPU stays in the page cache
    (read from disk as it is used), and one in another dtype is converted with no copy of the stored
    one held, so the process holds at most the model in `dtype`. `progress`: a bar over the files.
    """
    ref = path if isinstance(path, CheckpointRef) else find_checkpoint(path)
    record = ref.run_record
    cfg = record.model
    if ref.tokenizer is None:
        raise UserError(f"{ref.path} has no tokenizer: cannot turn text into its token ids")
    state = stack_expert_slices(read_module_weights(ref.path, mmap=True, progress=progress))
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
    zero_load_counters(model)          # buffers the checkpoint does not hold: training's counters,
    set_routing_groups(model, cfg.route_groups)   # and the groups the model config carries
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # The router keeps its bias in fp32 whatever the dtype (moe/fp32_state.py).
    model = model.to(device=device, dtype=dtype).eval() if dtype is not None else model.to(device=device).eval()
    return LoadedModel(model, ref, ref.tokenizer, record)


def load_master_model(reader: CheckpointReader) -> Transformer:
    """The model in fp32 on the CPU with the checkpoint's fp32 master weights, in eval mode.

    The module weights of a bf16 checkpoint are the masters rounded to bf16; the masters are what
    training continues from (and what scores from the Adam state read).
    """
    model = load_model(reader.path, "cpu", torch.float32).model
    masters = stack_expert_slices({name: state.fp32 for name, state in named_param_states(reader).items()})
    for alias, holder in reader.meta.shared_params.items():
        if holder in masters:
            masters.setdefault(alias, masters[holder])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in masters:
                raise UserError(f"the checkpoint holds no fp32 master weight for {name}")
            if masters[name].shape != param.shape:
                raise UserError(f"fp32 master weight of {name} has shape {tuple(masters[name].shape)}, "
                                f"the model {tuple(param.shape)}")
            param.copy_(masters[name])
    del masters
    gc.collect()
    return model
