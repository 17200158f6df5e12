"""Checkpoints from elsewhere: a file whose pickle would run code is refused by every command that
reads checkpoints, before anything is unpickled or written, and nothing runs; `--trust-checkpoints`
reads a file that holds a harmless class outside DeepSpeed's own."""

import argparse
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ROOT, check_ok, expand_cli, run_cli, run_train, tree_digest
from ds_upcycle.checkpoint.files import check_globals, load_file
from ds_upcycle.errors import UserError

pytestmark = [pytest.mark.slow]


class Payload:
    """Unpickling this runs a shell command (os.system): what a hostile checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, entry, value) -> None:
    """Re-save a checkpoint file (written by this test suite, so trusted here) with one extra entry."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    saved[entry] = value
    torch.save(saved, path)


@pytest.fixture
def copy_of_source(tmp_path, trained_source):
    src = tmp_path / "src"
    shutil.copytree(trained_source["src"], src)
    return src, src / (src / "latest").read_text().strip()


def assert_refused(proc, file, marker) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert file in lines[0] and "posix.system" in lines[0] and "--trust-checkpoints" in lines[0], lines[0]
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("file", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt",
                                  "layer_1_expert_3_mp_rank_00_model_states.pt"])
def test_expand_refuses_a_planted_payload_and_writes_nothing(tmp_path, copy_of_source, file):
    src, tag = copy_of_source
    marker = tmp_path / "ran"
    plant(tag / file, "extra", Payload(marker))
    digest = tree_digest(src)
    dst = tmp_path / "dst"
    assert_refused(expand_cli(str(src), str(dst), "-m", "2"), file, marker)
    assert not dst.exists() and tree_digest(src) == digest


def test_every_reading_command_refuses_it(tmp_path, copy_of_source, data_cache):
    src, tag = copy_of_source
    marker = tmp_path / "ran"
    plant(tag / "mp_rank_00_model_states.pt", "extra", Payload(marker))
    assert_refused(run_cli("export", str(src), str(tmp_path / "hf")), "mp_rank_00_model_states.pt", marker)
    assert_refused(run_cli("eval", str(src), "--tasks", "synthetic", "--limit", "2", "--output", str(tmp_path / "ev")),
                   "mp_rank_00_model_states.pt", marker)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ev").exists()
    # train.py --load: DeepSpeed would unpickle the files in full; the check comes first
    plant(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "extra", Payload(marker))
    proc = run_train(["--deepspeed_config", str(ROOT / "ds_configs" / "zero2_fp32.json"), "--load", str(src),
                      "--steps", "1", "--micro-batch-size", "4", "--ep-size", "2", "--fresh-schedule",
                      "--data-cache", str(data_cache), "--save", str(tmp_path / "cont")], num_procs=2)
    assert proc.returncode != 0 and not marker.exists()
    assert "mp_rank_00_model_states.pt would import posix.system" in proc.stdout + proc.stderr


def test_trust_opt_in_reads_a_harmless_unknown_class(tmp_path, copy_of_source):
    src, tag = copy_of_source
    plant(tag / "mp_rank_00_model_states.pt", "script_args", argparse.Namespace(lr=0.1))
    with pytest.raises(UserError, match="argparse.Namespace"):
        check_globals(tag / "mp_rank_00_model_states.pt")
    proc = expand_cli(str(src), str(tmp_path / "refused"), "-m", "2")
    assert proc.returncode != 0 and "argparse.Namespace" in proc.stderr
    check_ok(run_cli("--trust-checkpoints", "expand", str(src), str(tmp_path / "trusted"), "-m", "2"))
    assert (tmp_path / "trusted" / "latest").is_file()


def test_deepspeed_files_load_with_the_safe_loader(trained_source):
    # ZeRO-2 optimizer files pickle DeepSpeed's ZeroStageEnum, fragment_address and LossScaler
    optim = load_file(trained_source["tag"] / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    state = optim["optimizer_state_dict"]
    assert int(state["zero_stage"]) == 2 and state["loss_scaler"] is not None
    assert all(type(a).__name__ == "fragment_address" for group in state["param_slice_mappings"] for a in group.values())


@pytest.mark.slow
def test_optimizer_files_load_in_many_threads_at_once(trained_source):
    """reproduce expands several seeds at once in one process, each in a thread."""
    path = trained_source["tag"] / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda _: load_file(path), range(64)))
    assert all(int(state["optimizer_state_dict"]["zero_stage"]) == 2 for state in loaded)
