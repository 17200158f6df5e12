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
    # set, then deleted: monkeypatch records the value to restore (none, or the user's) only when it
    # changes a variable that exists, and _prepare_op_build sets it; left behind, it would send every
    # later launch of this test process to an empty build folder (a minute's rebuild, or more)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
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


def test_the_op_build_test_leaves_the_environment_as_it_found_it():
    """Runs after the test above in the same process (a file's tests run in order)."""
    assert "test_the_op_build" not in os.environ.get("TORCH_EXTENSIONS_DIR", "")


def test_the_cpu_is_chosen_where_there_is_no_gpu(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    use_cpu_without_gpu()
    assert os.environ.get("DS_ACCELERATOR") == (None if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    use_cpu_without_gpu()
    assert os.environ["DS_ACCELERATOR"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is DeepSpeed's on machines without a GPU")
def test_no_accelerator_warning_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    # Each command imports DeepSpeed (directly or through the model's modules) before it finds its
    # input missing; train.py imports it at once.
    cli = [sys.executable, "-m", "ds_upcycle.cli"]
    commands = ([*cli, "expand", str(tmp_path / "missing"), str(tmp_path / "out"), "-m", "2"],
                [*cli, "presets"], [*cli, "compare", str(tmp_path / "missing.json")],
                [*cli, "export", str(tmp_path / "missing"), str(tmp_path / "hf")],
                [sys.executable, str(ROOT / "train.py"), "--help"])
    for cmd in commands:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr, cmd


def test_help_imports_neither_torch_nor_deepspeed():
    """`ds-upcycle --help` and every command's help answer without the seconds torch takes to import."""
    probe = ("import sys\nfrom click.testing import CliRunner\nfrom ds_upcycle.cli import main\n"
             "for args in ([], *([name] for name in main.commands)):\n"
             "    result = CliRunner().invoke(main, [*args, '--help'])\n"
             "    assert result.exit_code == 0 and 'Usage:' in result.output, (args, result.output)\n"
             "heavy = sorted(m for m in ('torch', 'deepspeed', 'lm_eval', 'transformers', 'numpy') if m in sys.modules)\n"
             "print(len(main.commands), heavy)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, heavy = proc.stdout.split(" ", 1)
    assert int(count) >= 8 and heavy.strip() == "[]", proc.stdout
