"""What the checkpoint code reads of a DeepSpeed config: the ZeRO stage and the precision."""

from __future__ import annotations


def zero_stage(ds_config: dict | None) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def bf16_enabled(ds_config: dict | None) -> bool:
    return bool((ds_config or {}).get("bf16", {}).get("enabled"))
