"""Hugging Face weight files: safetensors written in shards with an index; safetensors or .bin read back."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 2**30


def write_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                  dtype_of: Callable[[str], torch.dtype] | None = None) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors and an index when larger than one shard.

    Each tensor is cast to dtype_of(name) (default: kept) as it is written, so memory holds one
    converted tensor, not a shard (5 GB) or the model.
    """
    def dtype(name: str) -> torch.dtype:
        return tensors[name].dtype if dtype_of is None else dtype_of(name)

    def nbytes(name: str) -> int:
        return tensors[name].numel() * torch.tensor([], dtype=dtype(name)).element_size()

    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        if shards[-1] and size + nbytes(name) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        index = {"metadata": {"total_size": sum(map(nbytes, tensors))}, "weight_map": weight_map}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    # Export of a 7B model writes for minutes: a bar over the bytes, gone when done.
    with tqdm(total=sum(map(nbytes, tensors)), unit="B", unit_scale=True, desc="writing weights", leave=False,
              dynamic_ncols=True) as bar:
        for file, shard in zip(files, shards):
            _write_safetensors(out_dir / file, shard, tensors, dtype, bar.update)
    return files


# The safetensors format: an 8-byte little-endian header length, a JSON header naming each tensor's
# dtype, shape and byte range, then the tensors' bytes back to back (little-endian, row-major).
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors(path: Path, names: list[str], tensors: Mapping[str, torch.Tensor],
                       dtype: Callable[[str], torch.dtype], written: Callable[[int], object] = lambda n: None) -> None:
    """One safetensors file, written one tensor at a time (safetensors' own save_file takes them all at once)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * torch.tensor([], dtype=dtype(name)).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype(name)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec's padding, so the tensors start 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            data = tensors[name].detach().to(device="cpu", dtype=dtype(name)).contiguous()
            if data.numel():
                f.write(data.reshape(-1).view(torch.uint8).numpy())
            written(data.numel() * data.element_size())


class WeightFiles(Mapping):
    """The tensors of a model directory by name, each read from its file only when asked for.

    model.safetensors, sharded safetensors, or .bin (sharded or not). Safetensors files are opened
    once (their headers name the tensors) and a tensor is read on access, so a caller that takes
    one tensor at a time holds one tensor; .bin files are memory-mapped.
    """

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir
        self._where: dict[str, object] = {}   # name -> open safetensors file, or the mapped .bin dict
        for file in _weight_files(hf_dir):
            if file.suffix == ".safetensors":
                handle = _open_safetensors(file)
                self._where.update((name, handle) for name in handle.keys())
            else:
                tensors = _read_bin(file)
                self._where.update((name, tensors) for name in tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        where = self._where[name]
        if isinstance(where, dict):
            return where[name]
        try:
            return where.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read {name} from {self.hf_dir}: {err}") from None

    def __contains__(self, name: object) -> bool:  # without reading the tensor, as Mapping's would
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, in memory."""
    return dict(WeightFiles(hf_dir))


def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    if (hf_dir / SAFE_INDEX).is_file():
        return _index_files(hf_dir / SAFE_INDEX)
    if (hf_dir / "pytorch_model.bin").is_file():
        return [hf_dir / "pytorch_model.bin"]
    if (hf_dir / BIN_INDEX).is_file():
        return _index_files(hf_dir / BIN_INDEX)
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


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises assorted types for corrupt or unsafe archives
        detail = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {path}: {type(err).__name__}: {detail}") from None
