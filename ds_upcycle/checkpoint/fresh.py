"""A model's weights as the checkpoint DeepSpeed saves before the optimizer's first step.

What `engine.save_checkpoint` writes right after `deepspeed.initialize` with torch's AdamW: module
weights, fp32 master weights equal to them, and no Adam moments. Built from a state dict alone (no
process group, no engine), so that weights converted from elsewhere (a transformers model) become a
state the writer lays out for any target; the stock-DeepSpeed tests check it against DeepSpeed's own
save.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import deepspeed
import torch
from deepspeed.checkpoint.constants import CLIP_GRAD, LOSS_SCALER
from deepspeed.runtime.fp16.loss_scaler import LossScaler

from ..errors import UserError
from .ds_config import zero_stage
from .names import split_expert_param
from .run_record import RunRecord
from .state import CheckpointMeta, MoELayer, NonExpertState, ParamGroup, ParamState

_ADAM_ONLY_KEYS = ("torch_adam", "adam_w_mode")  # DeepSpeed's switches, not torch hyperparameters


def adamw_hypers(ds_config: dict) -> dict:
    """The hyperparameters torch.optim.AdamW gives a parameter group under this DeepSpeed config."""
    optimizer = ds_config.get("optimizer", {})
    params = dict(optimizer.get("params", {}))
    if optimizer.get("type", "").lower() != "adamw" or not params.get("torch_adam"):
        raise UserError("a checkpoint before the first step is written for torch's AdamW "
                        "(optimizer type AdamW with torch_adam true) only")
    for key in _ADAM_ONLY_KEYS:
        params.pop(key, None)
    group = torch.optim.AdamW([torch.zeros(1)], **params).param_groups[0]
    return {k: v for k, v in group.items() if k != "params"}


@dataclass
class FreshSource:
    """A model's state before its first step, as a CheckpointSource: non-expert parameters in memory
    (fp32), each expert read from `state` only when the writer asks for it."""

    meta: CheckpointMeta
    moe_layers: list[MoELayer]
    non_expert: NonExpertState
    state: Mapping[str, torch.Tensor]

    def non_expert_state(self) -> NonExpertState:
        return self.non_expert

    def expert_state(self, layer: int, expert: int) -> dict[str, ParamState]:
        moe = self.moe_layers[layer]
        moe.check_expert(expert)
        return {suffix: ParamState(self.state[moe.param_name(expert, suffix)].float()) for suffix in moe.param_shapes}


def fresh_state(state: Mapping[str, torch.Tensor], param_names: list[str], shared_params: dict[str, str],
                ds_config: dict, client_state: dict, run_record: RunRecord | None = None,
                tokenizer=None) -> FreshSource:
    """The checkpoint state of a model before its first optimizer step, on one process (ep_size 1).

    state: the module's state dict, in module order (a Mapping that reads each tensor on access is
    read one expert at a time); param_names: its parameters in `named_parameters()` order (the
    optimizer's order); shared_params: tied names -> the name that holds the tensor. Every other
    state entry is a persistent buffer.
    """
    params = set(param_names)
    buffers = {n: state[n] for n in state if n not in params and n not in shared_params}
    layers = _moe_layers(state, param_names)
    hypers = adamw_hypers(ds_config)
    stage = zero_stage(ds_config)
    dense = [n for n in param_names if split_expert_param(n) is None]
    meta = CheckpointMeta(
        global_steps=0, global_samples=0, skipped_steps=0, lr_scheduler=None, client_state=client_state,
        ds_config=ds_config, ds_version=deepspeed.__version__, zero_stage=stage, dp_world_size=1, ep_size=1,
        module_dtype=torch.float32, optimizer_step=None,
        dense_groups=[ParamGroup({"name": "dense-params", **hypers}, dense)],
        expert_hypers={"name": "ep_size_1", "moe": True, **hypers} if layers else None,
        optimizer_extras={LOSS_SCALER: LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False,
                          CLIP_GRAD: float(ds_config.get("gradient_clipping", 0.0))} if stage else {},
        module_keys=[n for n in state if split_expert_param(n) is None], buffer_names=list(buffers),
        shared_params=dict(shared_params),
        model_extras={"data_sampler": None, "random_ltd": None, "mp_world_size": 1, "ds_autoep_layers": None,
                      "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1}},
        run_record=run_record, tokenizer=tokenizer)
    non_expert = NonExpertState({n: ParamState(state[n].float()) for n in dense}, buffers)
    return FreshSource(meta, layers, non_expert, state)


def _moe_layers(state: Mapping[str, torch.Tensor], param_names: list[str]) -> list[MoELayer]:
    """MoE layers in module order, with the names and shapes of one expert's parameters (expert 0's)."""
    by_prefix: dict[str, list[tuple[int, str, str]]] = {}
    for name in param_names:
        parts = split_expert_param(name)
        if parts is not None:
            by_prefix.setdefault(parts[0], []).append((parts[1], parts[2], name))
    layers = []
    for index, (prefix, entries) in enumerate(by_prefix.items()):
        shapes = {suffix: state[name].shape for expert, suffix, name in entries if expert == 0}
        layers.append(MoELayer(index, prefix, max(e for e, _, _ in entries) + 1, shapes))
    return layers
