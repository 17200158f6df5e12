"""Checkpoints saved without ZeRO (stage 0): read any layout, write any layout, checked against stock DeepSpeed.

Stage-0 MoE checkpoints keep the torch optimizer's state_dict per expert-parallel rank, keyed by
parameter index. Sources are trained with train.py on (dp, ep) in {(1,1), (2,2)}; what ds-upcycle
writes is loaded by `engine.load_checkpoint` on the target layout (tests/workers/checkpoint_worker.py
reads back every parameter, its Adam moments and the module weights) and saved again by DeepSpeed,
which must write exactly the same files.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from ckpt_helpers import (assert_deepspeed_saves_the_same, assert_same_params, duplicate_experts, merged_dump, run_worker,
                          train_command)
from conftest import bf16_ds_config, check_ok, expand_cli, run_train, tree_digest, write_ds_config
from ds_upcycle.checkpoint import load_state, named_param_states, read_checkpoint, write_checkpoint
from ds_upcycle.checkpoint.stage0 import Stage0Reader
from ds_upcycle.errors import UserError
from ds_upcycle.upcycle.config import ExpandConfig
from ds_upcycle.upcycle.expand import expand_checkpoint

TAG = "global_step3"
SOURCES = {"dp1-ep1": (1, 1), "dp2-ep2": (2, 2)}
# name: (source, target dp, target ep)
RESHARDS = {"dp2-ep2-to-dp1-ep1": ("dp2-ep2", 1, 1), "dp1-ep1-to-dp2-ep2": ("dp1-ep1", 2, 2)}

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage0")


@pytest.fixture(scope="module")
def ds_config(workdir) -> Path:
    return write_ds_config(workdir / "zero0.json", stage=0, micro_batch=4)


@pytest.fixture(scope="module")
def sources(workdir, ds_config, data_cache) -> dict[str, Path]:
    dirs = {}
    for name, (dp, ep) in SOURCES.items():
        dirs[name] = workdir / "src" / name
        check_ok(run_train(train_command(data_cache, ds_config, "--save", str(dirs[name]), "--ep-size", str(ep)),
                           num_procs=dp if dp > 1 else 0))
    return dirs


@pytest.fixture(scope="module")
def written(workdir, sources) -> dict[str, Path]:
    before = {name: tree_digest(path) for name, path in sources.items()}
    dirs = {}
    for name, (source, dp, ep) in RESHARDS.items():
        dirs[name] = workdir / "out" / name
        write_checkpoint(read_checkpoint(sources[source]), dirs[name], TAG, dp, ep)
    dirs["duplicated"] = workdir / "out" / "duplicated"
    write_checkpoint(duplicate_experts(load_state(read_checkpoint(sources["dp2-ep2"]))), dirs["duplicated"], TAG, 2, 2)
    dirs["expanded"] = workdir / "out" / "expanded"
    expand_checkpoint(ExpandConfig(str(sources["dp2-ep2"]), str(dirs["expanded"]), num_experts=6, world_size=1,
                                   ep_size=1, select="grad_sq"), progress=False)
    assert {name: tree_digest(path) for name, path in sources.items()} == before, "a source was modified"
    return dirs


@pytest.fixture(scope="module")
def oracle(workdir, sources, written, ds_config) -> dict[str, dict]:
    jobs: dict[int, list[dict]] = {}

    def add(name: str, ckpt: Path, dp: int, ep: int, resave: bool) -> None:
        jobs.setdefault(dp, []).append({
            "name": name, "ckpt": str(ckpt), "ds_config": str(ds_config), "dump": str(workdir / "dump" / name),
            "ep_size": ep, "resave": str(workdir / "resave" / name) if resave else None, "step": resave})

    for name, (dp, ep) in SOURCES.items():
        add(name, sources[name], dp, ep, resave=False)
    for name, (_, dp, ep) in RESHARDS.items():
        add(name, written[name], dp, ep, resave=True)
    add("duplicated", written["duplicated"], 2, 2, resave=True)
    add("expanded", written["expanded"], 1, 1, resave=True)
    (workdir / "dump").mkdir()
    for dp, world_jobs in jobs.items():
        run_worker(world_jobs, dp, workdir / f"jobs-{dp}.json")
    return {job["name"]: merged_dump(Path(job["dump"]), dp) for dp, js in jobs.items() for job in js}


@pytest.mark.parametrize("name", SOURCES)
def test_stage0_reader_matches_stock_load(name, sources, oracle):
    reader = read_checkpoint(sources[name])
    assert isinstance(reader, Stage0Reader)
    dump = oracle[name]
    assert_same_params(named_param_states(reader), dump)
    buffers = reader.non_expert_state().buffers
    assert sorted(buffers) == sorted(dump["buffers"]) and all(torch.equal(buffers[n], dump["buffers"][n]) for n in buffers)
    meta = reader.meta
    assert (meta.dp_world_size, meta.ep_size, meta.zero_stage) == (*SOURCES[name], 0)
    assert reader.num_experts == [4, 4] and meta.global_steps == dump["global_steps"] == 3
    assert meta.lr_scheduler == dump["lr_scheduler"] and meta.client_state["ds_upcycle"] == dump["client"]
    assert set(dump["step"]) == {float(meta.optimizer_step)}


@pytest.mark.parametrize("name", RESHARDS)
def test_stage0_reshard_round_trip(name, sources, written, oracle, workdir):
    source = read_checkpoint(sources[RESHARDS[name][0]])
    dump = oracle[name]
    assert_same_params(named_param_states(source), dump)
    assert dump["lr_scheduler"] == source.meta.lr_scheduler and dump["client"] == source.meta.client_state["ds_upcycle"]
    assert dump["train_step"]["params_moved"] == dump["train_step"]["params"]
    assert_deepspeed_saves_the_same(written[name] / TAG, workdir / "resave" / name / TAG)


def test_stage0_expanded_loads_and_trains(sources, written, oracle, workdir):
    expected = duplicate_experts(load_state(read_checkpoint(sources["dp2-ep2"])))
    dump = oracle["duplicated"]
    assert dump["num_experts"] == 8
    assert_same_params(named_param_states(expected), dump)
    assert_deepspeed_saves_the_same(written["duplicated"] / TAG, workdir / "resave" / "duplicated" / TAG)
    # `ds-upcycle expand` itself, 4 -> 6 experts onto one process: loads, and every parameter trains.
    dump = oracle["expanded"]
    assert dump["num_experts"] == 6 and dump["train_step"]["params_moved"] == dump["train_step"]["params"]
    assert math.isfinite(dump["train_step"]["loss"])
    manifest = json.loads((written["expanded"] / TAG / "upcycle_manifest.json").read_text())
    assert manifest["source"]["ep_size"] == 2 and manifest["target"] == {"world_size": 1, "ep_size": 1}


def test_stage0_refuses_conversion_to_zero(sources, tmp_path):
    config = json.loads((sources["dp1-ep1"] / TAG / "ds_upcycle.json").read_text())
    assert config  # a train.py checkpoint
    zero2 = {**read_checkpoint(sources["dp1-ep1"]).meta.ds_config, "zero_optimization": {"stage": 2}}
    with pytest.raises(UserError, match="converting between no ZeRO and ZeRO 1/2"):
        write_checkpoint(read_checkpoint(sources["dp1-ep1"]), tmp_path / "out", TAG, 1, 1, ds_config=zero2)
    assert not (tmp_path / "out").exists()


def test_stage0_bf16_is_refused_in_one_line(tmp_path, data_cache):
    """bf16 without ZeRO saves DeepSpeed's BF16_Optimizer wrapper state, which is not supported."""
    cfg = bf16_ds_config(tmp_path / "bf16-stage0.json", zero_optimization={"stage": 0})
    src = tmp_path / "src"
    check_ok(run_train(train_command(data_cache, cfg, "--save", str(src))))
    before = tree_digest(src)
    proc = expand_cli(str(src), str(tmp_path / "dst"), "-m", "2")
    assert proc.returncode == 2 and "mixed-precision optimizer" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert tree_digest(src) == before and not (tmp_path / "dst").exists()


def test_stage0_tied_embeddings_reshard(tmp_path, ds_config, data_cache):
    """DeepSpeed's stage-0 save clones the tied output weight: the tie is found by value and kept."""
    src = tmp_path / "src"
    check_ok(run_train(train_command(data_cache, ds_config, "--save", str(src), "--set", "tie_embeddings=true")))
    reader = read_checkpoint(src)
    assert reader.meta.shared_params == {"output.weight": "tok_embeddings.weight"}
    out = tmp_path / "out"
    write_checkpoint(reader, out, TAG, 2, 2)
    assert read_checkpoint(out).meta.shared_params == reader.meta.shared_params
    run_worker([{"name": "tied", "ckpt": str(out), "ds_config": str(ds_config), "dump": str(tmp_path / "tied"),
                 "ep_size": 2, "resave": str(tmp_path / "resave"), "step": True}], 2, tmp_path / "jobs.json")
    dump = merged_dump(tmp_path / "tied", 2)
    assert_same_params(named_param_states(reader), dump)
    assert dump["train_step"]["params_moved"] == dump["train_step"]["params"]
    assert_deepspeed_saves_the_same(out / TAG, tmp_path / "resave" / TAG)
