"""What a newcomer sees while they wait: DeepSpeed's one-time op build announced, kept per
environment; no accelerator warning on a machine without a GPU."""

import os
import subprocess
import sys

import pytest
import torch

from ds_upcycle import comm
from ds_upcycle.accelerator import use_cpu_without_gpu
from ds_upcycle.cache import extensions_dir

from conftest import ROOT

BUILD_NOTICE = "DeepSpeed is compiling its CPU communication op for this environment, once"


def test_the_op_build_is_announced_once_and_kept_per_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("DS_UPCYCLE_CACHE", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    comm._prepare_op_build()
    folder = os.environ["TORCH_EXTENSIONS_DIR"]
    assert folder == str(extensions_dir()) and folder.startswith(str(tmp_path / "torch_extensions"))
    assert BUILD_NOTICE in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # one notice per launch, from rank 0
    comm._prepare_op_build()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    built = tmp_path / "torch_extensions" / os.path.basename(folder) / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    comm._prepare_op_build()  # built already: silent
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))  # the user's own choice stays
    comm._prepare_op_build()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_the_cpu_is_chosen_where_there_is_no_gpu(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    use_cpu_without_gpu()
    assert os.environ.get("DS_ACCELERATOR") == (None if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    use_cpu_without_gpu()
    assert os.environ["DS_ACCELERATOR"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is DeepSpeed's on machines without a GPU")
def test_no_accelerator_warning_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    for cmd in ([sys.executable, "-m", "ds_upcycle.cli", "--help"], [sys.executable, str(ROOT / "train.py"), "--help"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "Setting accelerator to CPU" not in proc.stdout + proc.stderr, cmd
