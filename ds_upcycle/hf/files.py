"""Hugging Face weight files: safetensors written in shards with an index; safetensors or .bin read back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 2**30


def write_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors and an index when larger than one shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {name: file for file, shard in zip(names, shards) for name in shard}
        (out_dir / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
    for file, shard in zip(names, shards):
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
    return names


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory: model.safetensors, sharded safetensors, or .bin (sharded or not)."""
    if (hf_dir / "model.safetensors").is_file():
        return _read_safetensors(hf_dir / "model.safetensors")
    if (hf_dir / SAFE_INDEX).is_file():
        return {k: v for file in _index_files(hf_dir / SAFE_INDEX) for k, v in _read_safetensors(file).items()}
    if (hf_dir / "pytorch_model.bin").is_file():
        return _read_bin(hf_dir / "pytorch_model.bin")
    if (hf_dir / BIN_INDEX).is_file():
        return {k: v for file in _index_files(hf_dir / BIN_INDEX) for k, v in _read_bin(file).items()}
    raise UserError(f"{hf_dir} holds no model weights (model.safetensors, {SAFE_INDEX}, pytorch_model.bin or "
                    f"{BIN_INDEX})")


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{index} is not a weight index ({err})") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{index} names {missing[0]}, which is not in {index.parent}")
    return files


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises assorted types for corrupt or unsafe archives
        detail = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {path}: {type(err).__name__}: {detail}") from None
