"""The validation loss every part of ds-upcycle reports: one function, so the numbers compare.

Mean next-token cross-entropy over the first `num_samples` sequences of a split: the summed loss of
every target token divided by the number of target tokens (so it does not depend on the batch
size). Under a process group each rank scores its share of the sequences and the sums are added
over ranks; in one process it scores them all.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from .. import comm
from ..data.loader import PackedSequences, validation_batches
from ..errors import UserError
from .model import load_model

BATCH_SIZE = 8  # sequences per forward pass of checkpoint_loss; the sum over tokens does not depend on it


@torch.no_grad()
def validation_loss(model: torch.nn.Module, data: PackedSequences, num_samples: int, batch_size: int) -> float:
    """`model`: a Transformer or a DeepSpeed engine wrapping one (both return (logits, aux_loss))."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs_BT, targets_BT in validation_batches(data, num_samples, batch_size, comm.world_size(), comm.rank()):
        logits_BTV, _ = model(inputs_BT.to(device))
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.to(device).flatten(), reduction="sum")
        totals += torch.tensor([loss.item(), targets_BT.numel()], dtype=torch.float64)
    model.train(was_training)
    totals = comm.sum_over_world(totals.to(device)).cpu()
    return (totals[0] / totals[1]).item()


def checkpoint_loss(path, data: PackedSequences, samples: int, batch_size: int = BATCH_SIZE) -> float:
    """Validation loss of the checkpoint at `path`, rebuilt in one CPU process in fp32, on the first
    `samples` sequences of `data`."""
    loaded = load_model(path, "cpu", torch.float32)
    vocab = loaded.model.cfg.vocab_size
    used = data.tokens[:samples * data.seq_len + 1]  # the windows scored below
    if int(used.max()) >= vocab:
        raise UserError(f"the validation tokens exceed {path}'s vocabulary of {vocab}")
    try:
        return validation_loss(loaded.model, data, samples, batch_size)
    finally:
        del loaded
        gc.collect()
