"""Where `--split-copies` measures its directions: the router inputs of each expert's tokens.

The source model (fp32 masters) runs on calibration batches with a forward hook on every router;
the moments of the inputs each expert is chosen for become, per expert, the direction along which
its copies are pulled apart (operator.split_directions and split_router_rows).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..checkpoint import CheckpointReader
from ..moe.names import GATE
from ..trained import RunData, load_master_model
from ..trained.calibration_data import calibration_data
from ..trained.gradients import Batch
from .config import ExpandConfig
from .operator import SplitDirections, split_directions


@torch.no_grad()
def router_input_directions(model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, SplitDirections]:
    """For every MoE layer (by module prefix), SplitDirections of the router inputs each expert is
    chosen for (as one of a token's top-K): their moments are summed here, operator.split_directions
    turns them into directions."""
    moments: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def record(prefix):
        def hook(router, args, out):
            x_SD, experts_KS = args[0].double(), out.experts_KS.long()
            num_experts = router.num_experts
            chosen_SE = torch.zeros(x_SD.shape[0], num_experts, dtype=torch.float64)
            chosen_SE.scatter_(1, experts_KS.t(), 1.0)
            count_E = chosen_SE.sum(0)
            sum_ED = chosen_SE.t() @ x_SD
            outer_EDD = torch.einsum("se,sd,sf->edf", chosen_SE, x_SD, x_SD)
            totals = moments.setdefault(prefix, [torch.zeros_like(count_E), torch.zeros_like(sum_ED),
                                                 torch.zeros_like(outer_EDD)])
            for total, part in zip(totals, (count_E, sum_ED, outer_EDD)):
                total += part
        return hook

    for name, module in model.named_modules():
        if name.endswith(GATE):
            hooks.append(module.register_forward_hook(record(name.removesuffix(GATE))))
    was_training = model.training
    model.eval()
    try:
        for inputs_BT, _ in batches:
            model(inputs_BT)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {prefix: split_directions(*totals) for prefix, totals in moments.items()}


def measure_splits(cfg: ExpandConfig, source: CheckpointReader, run: RunData) -> tuple[dict[int, SplitDirections], dict]:
    """Split directions of every MoE layer's experts (by layer index), from the source model on the
    split data, and how they were measured (for the manifest)."""
    data = calibration_data(run, cfg.split_data, cfg.calibration_batches * cfg.calibration_batch_size)
    by_prefix = router_input_directions(load_master_model(source), data.batches(cfg.calibration_batch_size))
    splits = {layer.index: by_prefix[layer.prefix] for layer in source.moe_layers if layer.prefix in by_prefix}
    info = {"data": cfg.split_data, "description": data.description, "scale": cfg.split_scale,
            "sequences": int(data.windows.shape[0])}
    return splits, info
