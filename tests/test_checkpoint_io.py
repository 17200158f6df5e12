"""Checkpoint I/O: read any ZeRO-1/2 MoE layout, write any layout, checked against stock DeepSpeed.

The oracle is DeepSpeed itself (tests/workers/checkpoint_worker.py): a checkpoint loaded with
`engine.load_checkpoint` on a layout, every parameter read back with `safe_get_full_*`. Sources
are trained with train.py for a few steps on (dp, ep) in {(1,1), (2,1), (2,2)}; the model is
interleaved (MoE module index != block index) with widths that make DeepSpeed pad the flat groups,
so the padding rules are exercised. ZeRO 1 and 2 save the same files (one optimizer class,
DeepSpeedZeroOptimizer, writes both; only the recorded stage differs), so four sources cover the
six pairs of stage and layout: every layout, and each stage on two processes with padding.
"""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_helpers import (assert_deepspeed_saves_the_same, assert_same_params, duplicate_experts, load_pt, merged_dump,
                          run_worker, train_command)
from conftest import check_ok, run_train, tree_digest, write_ds_config
from ds_upcycle.checkpoint import (CheckpointMeta, CheckpointState, MoELayer, NonExpertState, ParamGroup, ParamState,
                                   RunRecord, load_state, named_param_states, read_checkpoint, write_checkpoint)
from ds_upcycle.checkpoint.layout import FlatGroup, alignment_paddings, flat_group, split_moe_group
from ds_upcycle.checkpoint.names import split_expert_param, zero_file
from ds_upcycle.config import ModelConfig
from ds_upcycle.errors import UserError
from ds_upcycle.model import Transformer

TAG = "global_step3"
# name: (data-parallel size, ep_size, ZeRO stage)
SOURCES = {"z1-dp1-ep1": (1, 1, 1), "z2-dp2-ep1": (2, 1, 2), "z1-dp2-ep2": (2, 2, 1), "z2-dp2-ep2": (2, 2, 2)}
# name: (source, target dp, target ep, ZeRO stage of the target config)
RESHARDS = {"z1-dp1-ep1-to-dp2-ep2": ("z1-dp1-ep1", 2, 2, 2),   # and ZeRO-1 -> ZeRO-2
            "z1-dp2-ep2-to-dp1-ep1": ("z1-dp2-ep2", 1, 1, 2),   # and ZeRO-1 -> ZeRO-2
            "z2-dp2-ep1-to-dp2-ep2": ("z2-dp2-ep1", 2, 2, 2),
            "z1-dp2-ep2-to-dp2-ep1": ("z1-dp2-ep2", 2, 1, 1)}
EXPANDED = ("z2-dp2-ep1", 2, 2, 2)   # 4 -> 8 experts, written for dp 2, ep 2


# -- fixtures: train sources, write targets, load everything with stock DeepSpeed --------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoint-io")


@pytest.fixture(scope="module")
def ds_configs(workdir) -> dict[int, Path]:
    return {stage: write_ds_config(workdir / f"zero{stage}.json", stage=stage, micro_batch=4) for stage in (1, 2)}


@pytest.fixture(scope="module")
def sources(workdir, ds_configs, data_cache) -> dict[str, Path]:
    dirs = {}
    for name, (dp, ep, stage) in SOURCES.items():
        dirs[name] = workdir / "src" / name
        check_ok(run_train(train_command(data_cache, ds_configs[stage], "--save", str(dirs[name]),
                                         "--ep-size", str(ep)), num_procs=dp if dp > 1 else 0))
    return dirs


@pytest.fixture(scope="module")
def written(workdir, sources, ds_configs) -> dict[str, Path]:
    before = {name: tree_digest(path) for name, path in sources.items()}
    dirs = {}
    for name, (source, dp, ep, stage) in RESHARDS.items():
        dirs[name] = workdir / "out" / name
        write_checkpoint(read_checkpoint(sources[source]), dirs[name], TAG, dp, ep,
                         ds_config=json.loads(ds_configs[stage].read_text()))
    source, dp, ep, stage = EXPANDED
    dirs["expanded"] = workdir / "out" / "expanded"
    write_checkpoint(duplicate_experts(load_state(read_checkpoint(sources[source]))), dirs["expanded"], TAG, dp, ep,
                     ds_config=json.loads(ds_configs[stage].read_text()))
    assert {name: tree_digest(path) for name, path in sources.items()} == before, "a source was modified"
    return dirs


@pytest.fixture(scope="module")
def oracle(workdir, sources, written, ds_configs) -> dict[str, dict]:
    """One worker launch per world size loads every checkpoint meant for it, each on its own layout;
    returns merged dumps by name."""
    jobs: dict[int, list[dict]] = {}

    def add(name: str, ckpt: Path, dp: int, ep: int, stage: int, resave: bool, step: bool) -> None:
        jobs.setdefault(dp, []).append({
            "name": name, "ckpt": str(ckpt), "ds_config": str(ds_configs[stage]), "dump": str(workdir / "dump" / name),
            "ep_size": ep, "resave": str(workdir / "resave" / name) if resave else None, "step": step})

    for name, (dp, ep, stage) in SOURCES.items():
        add(name, sources[name], dp, ep, stage, resave=False, step=False)
    for name, (_, dp, ep, stage) in RESHARDS.items():
        add(name, written[name], dp, ep, stage, resave=True, step=True)
    _, dp, ep, stage = EXPANDED
    add("expanded", written["expanded"], dp, ep, stage, resave=True, step=True)
    (workdir / "dump").mkdir()
    for dp, world_jobs in jobs.items():
        run_worker(world_jobs, dp, workdir / f"jobs-{dp}.json")
    return {job["name"]: merged_dump(Path(job["dump"]), dp) for dp, js in jobs.items() for job in js}


# -- against stock DeepSpeed -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", SOURCES)
def test_reader_matches_stock_load(name, sources, oracle):
    dp, ep, stage = SOURCES[name]
    reader = read_checkpoint(sources[name])
    dump = oracle[name]
    assert_same_params(named_param_states(reader), dump)
    buffers = reader.non_expert_state().buffers
    assert sorted(buffers) == sorted(dump["buffers"])
    assert all(torch.equal(buffers[n], dump["buffers"][n]) for n in buffers)
    meta = reader.meta
    assert (meta.dp_world_size, meta.ep_size, meta.zero_stage) == (dp, ep, stage)
    assert reader.num_experts == [4, 4] and [layer.prefix for layer in reader.moe_layers] == [
        "layers.1.ffn.moe", "layers.3.ffn.moe"]
    assert meta.global_steps == dump["global_steps"] == 3
    assert meta.lr_scheduler == dump["lr_scheduler"]
    assert meta.client_state["ds_upcycle"] == dump["client"]
    assert [float(meta.optimizer_step)] * 2 == dump["step"]
    assert meta.run_record.model.num_experts == 4 and meta.tokenizer.is_file()
    if dp > 1:  # the widths make DeepSpeed pad the last partition: the padding rules are exercised
        last = load_pt(sources[name] / TAG / zero_file(dp - 1))["optimizer_state_dict"]
        assert any(last["group_paddings"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", RESHARDS)
def test_reshard_round_trip(name, sources, written, oracle, workdir):
    source = read_checkpoint(sources[RESHARDS[name][0]])
    dump = oracle[name]
    assert_same_params(named_param_states(source), dump)
    assert dump["lr_scheduler"] == source.meta.lr_scheduler and dump["global_steps"] == 3
    assert dump["client"] == source.meta.client_state["ds_upcycle"]
    assert dump["train_step"]["params_moved"] == dump["train_step"]["params"]
    assert math.isfinite(dump["train_step"]["loss"])
    assert_deepspeed_saves_the_same(written[name] / TAG, workdir / "resave" / name / TAG)


@pytest.mark.slow
@pytest.mark.distributed
def test_expanded_checkpoint_loads_and_trains(sources, written, oracle, workdir):
    expanded = duplicate_experts(load_state(read_checkpoint(sources[EXPANDED[0]])))
    dump = oracle["expanded"]
    assert dump["num_experts"] == 8
    assert_same_params(named_param_states(expanded), dump)
    for name, bias in dump["buffers"].items():
        assert torch.equal(bias, expanded.non_expert.buffers[name])
    assert dump["train_step"]["params_moved"] == dump["train_step"]["params"]
    assert_deepspeed_saves_the_same(written["expanded"] / TAG, workdir / "resave" / "expanded" / TAG)
    tag_dir = written["expanded"] / TAG
    assert json.loads((tag_dir / "ds_upcycle.json").read_text())["model"]["num_experts"] == 8
    assert (tag_dir / "tokenizer.model").read_bytes() == (sources[EXPANDED[0]] / TAG / "tokenizer.model").read_bytes()
    assert (written["expanded"] / "latest").read_text() == TAG


# -- layout rules, by hand ---------------------------------------------------------------------

def test_flat_group_partitions_and_padding():
    group = FlatGroup(("a", "b", "c"), (5, 7, 3), (0, 0, 0), dp_size=2)
    assert (group.used_numel, group.flat_numel, group.partition_size) == (15, 16, 8)
    assert [group.group_padding(p) for p in (0, 1)] == [0, 1]
    assert [(f.partition, f.param_start, f.partition_start, f.numel) for f in group.locate("b")] == [
        (0, 0, 5, 3), (1, 3, 0, 4)]
    assert [(f.name, f.partition_start, f.numel) for f in group.fragments(1)] == [("b", 0, 4), ("c", 4, 3)]
    tiny = FlatGroup(("a",), (3,), (0,), dp_size=4)   # partitions beyond the data are all padding
    assert (tiny.partition_size, [tiny.group_padding(p) for p in range(4)]) == (2, [0, 1, 2, 2])


def test_parameter_alignment_and_moe_group_split():
    assert alignment_paddings([5, 7, 3], element_size=4, enabled=True) == [3, 1, 0]
    assert alignment_paddings([1, 6, 3], element_size=4, enabled=True) == [3, 2, 0]
    assert alignment_paddings([1, 6, 3], element_size=2, enabled=True) == [7, 2, 0]
    assert alignment_paddings([5, 7, 3], element_size=4, enabled=False) == [0, 0, 0]
    assert flat_group(["a", "b"], [5, 7], 1, 4, True).offsets == {"a": 0, "b": 8}
    assert split_moe_group([4, 4, 4, 4, 4], max_numel=8) == [range(2), range(2, 4), range(4, 5)]
    assert split_moe_group([4, 9, 4], max_numel=8) == [range(1), range(1, 2), range(2, 3)]


# -- writer and reader without DeepSpeed engines -----------------------------------------------

SYNTH = ModelConfig(vocab_size=97, dim=22, n_layers=4, n_heads=1, n_kv_heads=1, dense_ffn_dim=30,
                    expert_ffn_dim=13, num_experts=4, top_k=2, moe_layer_freq=2)


def synthetic_state(tokenizer: Path | None = None) -> CheckpointState:
    """A full state for SYNTH with random moments, shaped like a train.py checkpoint's."""
    model = Transformer(SYNTH)
    gen = torch.Generator().manual_seed(0)

    def state_of(param) -> ParamState:
        return ParamState(param.detach().clone(), torch.randn(param.shape, generator=gen),
                          torch.rand(param.shape, generator=gen))

    names = model.global_param_names()
    dense = {n: state_of(p) for n, p in model.named_parameters() if split_expert_param(n) is None}
    experts, layers = {}, []
    for index, block_id in enumerate(SYNTH.moe_layer_ids):
        prefix = f"layers.{block_id}.ffn.moe"
        shapes = {}
        for name, param in model.named_parameters():
            split = split_expert_param(names[name])
            if split and split[0] == prefix:
                experts.setdefault((index, split[1]), {})[split[2]] = state_of(param)
                shapes[split[2]] = param.shape
        layers.append(MoELayer(index, prefix, SYNTH.num_experts, shapes))
    buffers = {n: torch.randn(b.shape, generator=gen) for n, b in model.state_dict().items() if "route_bias" in n}
    hypers = {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.1, "amsgrad": False}
    meta = CheckpointMeta(
        global_steps=5, global_samples=40, skipped_steps=0, lr_scheduler={"step_count": 5}, client_state={"me": 1},
        ds_config={"zero_optimization": {"stage": 2}}, ds_version="0.19.8", zero_stage=2, dp_world_size=1,
        ep_size=1, module_dtype=torch.float32, optimizer_step=torch.tensor(5.0),
        dense_groups=[ParamGroup({"name": "dense-params", **hypers}, list(dense))],
        expert_hypers={"name": "ep_size_1", "moe": True, **hypers}, optimizer_extras={"clip_grad": 1.0},
        module_keys=[k for k in model.state_dict() if split_expert_param(k) is None], buffer_names=list(buffers),
        shared_params={}, model_extras={}, run_record=RunRecord(SYNTH), tokenizer=tokenizer)
    return CheckpointState(meta, layers, NonExpertState(dense, buffers), experts)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[CheckpointState, Path]:
    """The synthetic state and a copy written for 4 ranks with ep_size 2."""
    root = tmp_path_factory.mktemp("synthetic")
    (root / "tokenizer.model").write_bytes(b"spm")
    state = synthetic_state(root / "tokenizer.model")
    return state, write_checkpoint(state, root / "ckpt", "step5", world_size=4, ep_size=2)


@pytest.mark.parametrize("world,ep", [(1, 1), (3, 1), (4, 2), (4, 4), (8, 2)])
def test_write_read_round_trip_any_layout(world, ep, synthetic, tmp_path):
    state, _ = synthetic
    write_checkpoint(state, tmp_path / "out", "step5", world, ep)
    reader = read_checkpoint(tmp_path / "out")
    expected, got = named_param_states(state), named_param_states(reader)
    assert sorted(expected) == sorted(got)
    for name in expected:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(expected[name], key), getattr(got[name], key)), (name, key)
    meta = reader.meta
    assert (meta.dp_world_size, meta.ep_size, meta.global_steps, meta.client_state) == (world, ep, 5, {"me": 1})
    assert all(torch.equal(b, state.non_expert.buffers[n]) for n, b in reader.non_expert_state().buffers.items())
    assert (tmp_path / "out" / "step5" / "tokenizer.model").read_bytes() == b"spm"


def test_expert_state_reads_one_expert(synthetic):
    state, tag_dir = synthetic
    reader = read_checkpoint(tag_dir)
    assert [layer.prefix for layer in reader.moe_layers] == ["layers.1.ffn.moe", "layers.3.ffn.moe"]
    got = reader.expert_state(1, 3)
    assert sorted(got) == ["w_down.weight", "w_gate.weight", "w_up.weight"]
    assert torch.equal(got["w_up.weight"].exp_avg_sq, state.experts[(1, 3)]["w_up.weight"].exp_avg_sq)
    with pytest.raises(UserError, match="no expert 4"):
        reader.expert_state(1, 4)


def copy_checkpoint(tag_dir: Path, dst: Path) -> Path:
    shutil.copytree(tag_dir, dst / tag_dir.name)
    return dst / tag_dir.name


def rewrite_zero_file(tag_dir: Path, rank: int, change) -> None:
    path = tag_dir / zero_file(rank)
    saved = load_pt(path)
    change(saved["optimizer_state_dict"])
    torch.save(saved, path)


def set_key(key, value):
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / zero_file(2)).unlink(), "missing for rank\\(s\\) 2 of 4"),
    (lambda d: (d / zero_file(1)).write_bytes((d / zero_file(1)).read_bytes()[:500]), "truncated or corrupt"),
    (lambda d: rewrite_zero_file(d, 3, set_key("partition_count", [4, 1])), "disagree on partition_count"),
    (lambda d: rewrite_zero_file(d, 1, set_key("ds_version", "0.18.0")), "disagree on ds_version"),
    (lambda d: (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b""), "ZeRO-3"),
    (lambda d: (d / "mp_rank_01_model_states.pt").write_bytes(b""), "tensor"),
    (lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint"), "truncated or corrupt"),
    (lambda d: (d / zero_file(0)).rename(d / zero_file(0, bf16=True)), "mixes bf16_zero_pp_rank"),
    (lambda d: (d / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink(), "expert file"),
])
def test_reader_refuses_broken_checkpoints(damage, message, synthetic, tmp_path):
    tag_dir = copy_checkpoint(synthetic[1], tmp_path)
    damage(tag_dir)
    with pytest.raises(UserError, match=message) as err:
        named_param_states(read_checkpoint(tag_dir))
    assert "\n" not in str(err.value)


def test_reader_refuses_non_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not a DeepSpeed checkpoint"):
        read_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="not a DeepSpeed model-states file"):
        read_checkpoint(tmp_path)


def test_reader_refuses_zero3_config(synthetic, tmp_path):
    tag_dir = copy_checkpoint(synthetic[1], tmp_path)
    model = load_pt(tag_dir / "mp_rank_00_model_states.pt")
    model["ds_config"] = {"zero_optimization": {"stage": 3}}
    torch.save(model, tag_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="ZeRO-3"):
        read_checkpoint(tag_dir)


def test_writer_is_atomic_and_refuses_bad_targets(synthetic, tmp_path):
    state, tag_dir = synthetic
    with pytest.raises(UserError, match="not divisible by ep_size 3"):
        write_checkpoint(state, tmp_path / "a", "t", 3, 3)
    with pytest.raises(UserError, match="already exists"):
        write_checkpoint(state, tag_dir.parent, tag_dir.name, 4, 2)
    reader = read_checkpoint(tag_dir)
    with pytest.raises(UserError, match="source checkpoint's directory"):
        write_checkpoint(reader, tag_dir.parent, "other", 4, 2)
    broken = copy.copy(state)
    broken.experts = {**state.experts, (0, 2): {}}   # fails halfway through writing
    with pytest.raises(UserError, match="expert 2"):
        write_checkpoint(broken, tmp_path / "b", "t", 2, 1)
    assert list(tmp_path.iterdir()) == []   # nothing left behind
