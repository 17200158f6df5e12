"""`ds-upcycle export`: a checkpoint as a transformers model directory.

The model comes from the one whole-model loader (any ZeRO stage, data-parallel size and ep_size), goes
through its family's name table, and is written with the family's config.json, generation_config.json
and the checkpoint's tokenizer, into a directory that appears whole or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from ..atomic import check_destination, staged_dir
from ..choices import EXPORT_DTYPES
from ..dtypes import parse_dtype
from ..errors import UserError
from ..model import Transformer
from ..moe.live import live_moe_layers
from ..moe.stacked import legacy_layout_state
from ..trained import load_model
from .family import Family
from .files import MAX_SHARD_BYTES, write_weights
from .registry import export_family
from .tokenizer import special_token_ids, write_hf_tokenizer



@dataclass
class ExportResult:
    out_dir: Path
    family: Family
    dtype: str
    weight_files: list[str]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> ExportResult:
    """Write `checkpoint` (save dir or tag dir, any layout) as a transformers model directory `out_dir`."""
    check_destination(Path(out_dir), force)
    loaded = load_model(checkpoint, "cpu", dtype=None)  # as stored: each shard is cast when written
    imported = loaded.record.imported_from
    return write_hf_model(loaded.model, loaded.tokenizer, out_dir, dtype,
                          seq_len=imported.max_position_embeddings if imported else loaded.record.seq_len,
                          prefer=imported.model_type if imported else None, force=force,
                          max_shard_bytes=max_shard_bytes)


def write_hf_model(model: Transformer, tokenizer: Path, out_dir: str | Path, dtype: str = "float32",
                   seq_len: int | None = None, prefer: str | None = None, force: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> ExportResult:
    """Write `model` with `tokenizer` as a transformers model directory (atomically: whole or not at all).

    seq_len becomes max_position_embeddings (the context the model was trained on); prefer names
    the family to use when several fit (the one a checkpoint was imported from).
    """
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export writes {' or '.join(EXPORT_DTYPES)} weights, not {dtype!r}")
    cfg = model.cfg
    has_bias = any(bool(layer.routing_bias.any()) for layer in live_moe_layers(model))
    family = export_family(cfg, has_bias, prefer)
    tensors = family.to_hf(cfg, legacy_layout_state(model.state_dict()))
    bos, eos = special_token_ids(tokenizer)
    with staged_dir(out_dir, "replace" if force else "refuse") as staging:
        hf_config = AutoConfig.for_model(family.model_type, **family.config_to_hf(cfg))
        hf_config.architectures = [family.architecture]
        hf_config.max_position_embeddings = seq_len or hf_config.max_position_embeddings
        hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id = bos, eos, eos
        hf_config.dtype = dtype
        hf_config.save_pretrained(str(staging))
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(str(staging))
        # The selection bias stays fp32 (as in training and in the families' own modules).
        weights_dtype = parse_dtype(dtype)
        files = write_weights(tensors, staging, max_shard_bytes,
                              lambda name: torch.float32 if family.is_bias(name) else weights_dtype)
        write_hf_tokenizer(tokenizer, staging)
    return ExportResult(Path(out_dir), family, dtype, files)

