"""The token windows that experts are scored on (and split directions measured on), in order.

Calibration reads the first windows of seq_len + 1 tokens of a data source: "source" (the cpt split
of the checkpoint's own training data) or any source train.py takes. The same windows, cut into the
same batches, give one CPU process (`expand --calibration-data`) and a DeepSpeed job
(`train.py --score-experts`) the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.sources import resolve_source
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from .data import RunData
from .gradients import Batch

SOURCE_DATA = "source"  # the cpt split of the checkpoint's own training data
SOURCE_SPLIT = "cpt"


@dataclass(frozen=True)
class CalibrationData:
    """The token windows calibration reads, in order, and where they came from."""

    windows: np.ndarray          # [num_windows, seq_len + 1] token ids
    description: str

    def batches(self, batch_size: int) -> list[Batch]:
        rows = torch.from_numpy(self.windows.astype(np.int64))
        return [(chunk[:, :-1], chunk[:, 1:]) for chunk in rows.split(batch_size)]

    def shares(self, batch_size: int, rank: int, world: int, micro_batch: int) -> list[list[Batch]]:
        """Process `rank`'s share of every full batch of `batch_size` windows (its batch_size / world
        consecutive windows), in micro-batches of `micro_batch`."""
        share = batch_size // world
        if share * world != batch_size or share % micro_batch:
            raise UserError(f"a batch of {batch_size} sequences does not split into {world} processes' "
                            f"micro-batches of {micro_batch}")
        rows = torch.from_numpy(self.windows.astype(np.int64))
        starts = range(0, len(rows) - batch_size + 1, batch_size)
        return [[(chunk[:, :-1], chunk[:, 1:]) for chunk in rows[s + rank * share:s + (rank + 1) * share].split(micro_batch)]
                for s in starts]


def check_calibration_source(spec: str, run: RunData) -> None:
    """Fail early (before anything is read in bulk or written) if the calibration data cannot be had."""
    if spec == SOURCE_DATA:
        run.check_has_source()
    else:
        resolve_source(spec)  # a missing path is refused here; a hub name is only tried when read


def calibration_data(run: RunData, spec: str, num_windows: int) -> CalibrationData:
    """The first `num_windows` windows of seq_len + 1 tokens of the calibration data, in order.

    `spec` "source": the cpt split of the checkpoint's own training data (prepared and cached as
    train.py does). Otherwise a data source as train.py takes it (synthetic[:...], a .txt/.jsonl/
    .parquet file or directory, a hub dataset): every document in the source's order, each
    followed by EOS, tokenized with the checkpoint's tokenizer, concatenated; no split is taken
    out, and reading stops once enough tokens are in hand.
    """
    seq_len, needed = run.seq_len, num_windows * run.seq_len + 1
    if spec == SOURCE_DATA:
        tokens = np.asarray(run.tokens(SOURCE_SPLIT)[:needed])
        description = f"{SOURCE_SPLIT} split of the source's training data ({run.config.source})"
    else:
        text = resolve_source(spec, run.text_field)
        tokenizer = load_tokenizer(run.tokenizer)
        pieces, have = [], 0
        for doc in text.documents():
            if not doc.strip():
                continue
            ids = tokenizer.encode(doc) + [tokenizer.eos_id]
            pieces.append(np.asarray(ids, dtype=np.int64))
            have += len(ids)
            if have >= needed:
                break
        tokens = np.concatenate(pieces)[:needed] if pieces else np.zeros(0, dtype=np.int64)
        description = text.description
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise UserError(f"calibration data {spec!r} has {len(tokens)} tokens, fewer than one sequence of "
                        f"{seq_len + 1}")
    windows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]).astype(np.int64)
    if int(windows.max()) >= run.vocab_size:
        raise UserError(f"calibration tokens exceed the model's vocabulary of {run.vocab_size}")
    return CalibrationData(windows, description)
