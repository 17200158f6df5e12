"""Shared by the tests/test_eval_*.py files: trained checkpoints (built once per test run) and an
offline hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import built_once, run_train, shared_base, tiny_run_args, write_ds_config

STEPS = 200
TWIN_STEPS = 6      # the 1- and 2-process runs agree to float precision only over a few steps
SEQ_LEN = 32


def train_args(ds_config: Path, data_cache: Path, steps: int, *extra: str) -> list[str]:
    return tiny_run_args(ds_config, steps, data_cache, "--seq-len", str(SEQ_LEN), "--eval-interval", str(steps),
                         *extra)


def trained_checkpoint(tmp_path_factory, data_cache: Path, ep_size: int = 1, steps: int = STEPS) -> Path:
    """The save directory of a tiny 4-expert run: one process, or two with expert parallelism; built
    once per test run.

    Both layouts see the same global batch of 8 sequences, so they are the same training run.
    """
    def build(root: Path) -> dict:
        cfg = write_ds_config(root / "ds.json", stage=2, micro_batch=8 // ep_size)
        save = root / "run"
        extra = ["--save", str(save)] + (["--ep-size", str(ep_size)] if ep_size > 1 else [])
        proc = run_train(train_args(cfg, data_cache, steps, *extra), num_procs=ep_size if ep_size > 1 else 0)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {"save": str(save)}

    return Path(built_once(shared_base(tmp_path_factory), f"eval-ckpt-ep{ep_size}-{steps}", build)["save"])


@pytest.fixture
def offline_hub(monkeypatch):
    """Nothing may try the network: the hub is unreachable here and must fail fast."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class Request:
    """The part of lm-eval's Instance that model classes read."""

    def __init__(self, *args) -> None:
        self.args = args
