"""Loss-free load balancing for anyone's DeepSpeed AutoEP training script.

DeepSpeed's AutoEP layer (deepspeed.module_inject.auto_ep_layer.AutoEPMoELayer, 0.19.x) already
adds an `expert_bias` to the router's scores only to choose the top-K experts (the rule of
loss-free balancing), but has no update for it: its presets refuse `load_balance_coeff`, and the
bias stays None. The layer also keeps a running per-rank count of the tokens routed to each expert
(`tokens_per_expert`) that nothing resets. `attach_loss_free_balancing` supplies the rest:

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    balancer = attach_loss_free_balancing(engine, step_size=1e-3)   # before engine.load_checkpoint
    ...                                                              # the loop is unchanged

It gives every AutoEP layer a persistent fp32 `expert_bias` buffer (zeros; it travels in the
checkpoint with the module weights, so attach before loading a checkpoint that has one), and after
every optimizer step (a post-step hook on the torch optimizer inside the engine, run once per
engine step: once per global batch, whatever the gradient accumulation) sums the counts over all processes and moves each bias
by u * sign(mean load - load) (moe/balance.py's balance_biases, as for ds-upcycle's own router);
then it clears the counts. Forward passes in eval mode are not counted.

transformers 5.24 and DeepSpeed 0.19.8 disagree on the output-capture registry
(`_CanRecordRegistry.get() takes 2 positional arguments but 3 were given` inside
deepspeed.initialize): `patch_transformers_registry()` makes transformers' registry accept
DeepSpeed's call; call it before `deepspeed.initialize`.
"""

from __future__ import annotations

import torch
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

from .. import comm
from .balance import balance_biases


def patch_transformers_registry() -> bool:
    """Let transformers' output-capture registry take DeepSpeed AutoEP's `get(key, default)` calls.

    transformers 5.x keys the registry by str(model class) and its `get(model)` takes the model
    only; AutoEP's presets call `get(key_string, default)`. The patched `get` accepts either a model
    or a key, and a default. Returns whether a patch was applied (False: no transformers, or its
    registry already takes a default).
    """
    try:
        from transformers.utils import output_capturing  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return False
    registry = getattr(output_capturing, "_CanRecordRegistry", None)
    if registry is None or getattr(registry.get, "takes_default", False):
        return False
    missing = object()

    def get(self, model, default=missing):
        key = model if isinstance(model, str) else str(model.__class__)
        value = dict.get(self, key, missing)
        if value is missing or value is None:
            return {} if default is missing else default
        return value

    get.takes_default = True
    registry.get = get
    return True


class AutoEPBalancer:
    """The loss-free bias update of every AutoEP layer of an engine (see attach_loss_free_balancing)."""

    def __init__(self, layers: list[AutoEPMoELayer], step_size: float) -> None:
        self.layers, self.step_size = layers, step_size
        self.last_load: list[dict] = []   # load_stats of each layer for the last global batch

    def step(self) -> list[dict]:
        """Update every layer's bias from the tokens counted since the last call, then clear the counts."""
        self.last_load = balance_biases([layer.expert_bias for layer in self.layers],
                                        [layer.tokens_per_expert for layer in self.layers], self.step_size,
                                        comm.sum_over_world)
        return self.last_load


def attach_loss_free_balancing(engine, step_size: float = 1e-3) -> AutoEPBalancer:
    """Give an initialised DeepSpeed engine's AutoEP layers loss-free balancing; returns the balancer.

    Call after `deepspeed.initialize` and before `engine.load_checkpoint`. Raises ValueError when the
    engine has no AutoEP layer or no optimizer to hook.
    """
    layers = prepare_balancing(engine.module)
    if not layers:
        raise ValueError("the engine has no AutoEP MoE layer (is expert_parallel enabled in the DeepSpeed config?)")
    balancer = AutoEPBalancer(layers, step_size)
    done = {"at": None}

    def after_step(*_) -> None:
        # ZeRO steps the torch optimizer once per parameter group: update once per engine step.
        if done["at"] != engine.global_steps:
            done["at"] = engine.global_steps
            balancer.step()

    _torch_optimizer(engine).register_step_post_hook(after_step)
    return balancer


def prepare_balancing(model: torch.nn.Module) -> list[AutoEPMoELayer]:
    """Give every AutoEP layer of a model the fp32 `expert_bias` buffer and counts of training
    batches only (eval passes leave them as they were); returns the layers."""
    layers = [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]
    for layer in layers:
        _add_bias(layer)
        layer.register_forward_pre_hook(_keep_counts_in_eval)
        layer.register_forward_hook(_restore_counts_in_eval)
    return layers


def _add_bias(layer: AutoEPMoELayer) -> None:
    if isinstance(getattr(layer, "expert_bias", None), torch.Tensor):
        layer.expert_bias.data = layer.expert_bias.data.float()
        return
    counts = layer.tokens_per_expert
    if hasattr(layer, "expert_bias"):
        del layer.expert_bias  # AutoEP sets a plain None attribute when it keeps no bias
    layer.register_buffer("expert_bias", torch.zeros(counts.numel(), dtype=torch.float32, device=counts.device),
                          persistent=True)
    counts.zero_()  # what was counted before balancing began is not a training batch of ours


def _keep_counts_in_eval(layer: AutoEPMoELayer, args) -> None:
    layer._counts_before_eval = None if layer.training else layer.tokens_per_expert.clone()


def _restore_counts_in_eval(layer: AutoEPMoELayer, args, output) -> None:
    if getattr(layer, "_counts_before_eval", None) is not None:
        layer.tokens_per_expert.copy_(layer._counts_before_eval)
        layer._counts_before_eval = None


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16): its step runs once per global batch."""
    optimizer = engine.optimizer
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    if optimizer is None:
        raise ValueError("the engine has no optimizer to update the bias after")
    return optimizer
