"""ds-upcycle expand end to end: real checkpoints in, stock DeepSpeed loads what comes out.

The oracle is DeepSpeed itself: the source and the expanded checkpoint are each loaded with stock
`engine.load_checkpoint` on their layout (tests/workers/checkpoint_worker.py) and every parameter
is read back with `safe_get_full_*`. The expected expanded state is computed directly from the
source's dump and the plan in the manifest: expert j is source expert sources[j], router rows
likewise, Adam moments by the chosen mode.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckpt_helpers import assert_deepspeed_saves_the_same, merged_dump, run_worker
from conftest import (ROOT, SOURCE_MODEL, check_ok, expand_cli, launch_env, launcher, run_train, tiny_run_args,
                      tree_digest, write_ds_config)
from ds_upcycle.cli import main as cli_main
from ds_upcycle.moe.names import GATE, expert_param, router_weight, split_expert_param, with_expert_id
from ds_upcycle.upcycle.operator import allocate_copies

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def work(tmp_path_factory, trained_source):
    """conftest's trained source (dp 2, ep 2, ZeRO-2, 4 experts) and a folder for this module's outputs."""
    return {**trained_source, "root": tmp_path_factory.mktemp("expand")}


def expected_state(source: dict, manifest: dict, mode: str) -> dict:
    """Each expanded parameter computed from the source's full state and the plan."""
    params = dict(source["params"])
    out = {n: v for n, v in params.items() if split_expert_param(n) is None and GATE not in n}
    for layer in manifest["layers"]:
        prefix, sources, counts = layer["prefix"], layer["sources"], layer["counts"]
        first = {s: sources.index(s) for s in set(sources)}
        def factor(j, moment):
            if moment == 0 or mode in ("copy", "fresh"):
                return 1.0
            if mode == "reset":
                return 1.0 if first[sources[j]] == j else 0.0
            return (1.0 / counts[sources[j]]) ** moment
        router = params[router_weight(prefix)]
        out[router_weight(prefix)] = {
            key: torch.stack([router[key][s] * factor(j, m) for j, s in enumerate(sources)])
            for m, key in ((0, "fp32"), (1, "exp_avg"), (2, "exp_avg_sq"))}
        for j, s in enumerate(sources):
            for name, tensors in params.items():
                parts = split_expert_param(name)
                if parts is not None and parts[:2] == (prefix, s):
                    out[with_expert_id(name, j)] = {"fp32": tensors["fp32"], "exp_avg": tensors["exp_avg"] * factor(j, 1),
                                     "exp_avg_sq": tensors["exp_avg_sq"] * factor(j, 2)}
    if mode == "fresh":  # no Adam state at all: the weights alone
        out = {name: {"fp32": tensors["fp32"]} for name, tensors in out.items()}
    return out


# name: (expand's arguments, target world size, target ep_size, Adam state expected, a training step
# after the load); every one is loaded by stock DeepSpeed in the `loaded` fixture
EXPANSIONS = {
    "copy-1-1": (["-m", "2", "--select", "grad_sq", "--world-size", "1", "--ep-size", "1"], 1, 1, "copy", True),
    "scale-2-2": (["--num-experts", "6", "--select", "uniform", "--optimizer-state", "scale", "--world-size", "2"],
                  2, 2, "scale", True),
    "reset-2-1": (["-m", "3", "--select", "saliency", "--optimizer-state", "reset", "--ep-size", "1"], 2, 1, "reset",
                  True),
    # the paper's code: rank fill, no optimizer state, noise relative to the biases' spread
    "fresh-2-2": (["-m", "2", "--allocate", "rank", "--optimizer-state", "fresh", "--router-noise-relative",
                   "--router-noise", "0.5"], 2, 2, "fresh", True),
    "layer-1-only": (["-m", "2", "--layers", "1"], 2, 2, "copy", True),
    "reshard-1-1": (["-m", "1", "--world-size", "1", "--ep-size", "1"], 1, 1, "copy", False),
    "reshard-2-2": (["-m", "1", "--world-size", "2", "--ep-size", "2"], 2, 2, "copy", False),
}


@pytest.fixture(scope="module")
def loaded(work, bf16_source) -> dict:
    """Every expansion of EXPANSIONS (and a bf16 one) written by `ds-upcycle expand`, then loaded with
    stock `engine.load_checkpoint` together with its source: one oracle launch per world size."""
    root = work["root"]
    procs, jobs = {}, {}

    def add(name, ckpt, world, ep, step, cfg):
        jobs.setdefault(world, []).append({"name": name, "ckpt": str(ckpt), "ds_config": str(cfg), "ep_size": ep,
                                           "dump": str(root / "dump" / name), "resave": None, "step": step})

    add("source", work["src"], 2, 2, False, work["cfg"])
    for name, (args, world, ep, _, step) in EXPANSIONS.items():
        procs[name] = expand_cli(str(work["src"]), str(root / name), *args)
        if procs[name].returncode == 0:  # a failed expansion fails its own test, not the others
            add(name, root / name, world, ep, step, work["cfg"])
    bf16 = bf16_source["src"]
    procs["bf16"] = expand_cli(str(bf16), str(root / "bf16"), "-m", "2", "--select", "uniform")
    add("bf16-source", bf16, 1, 1, False, bf16_source["cfg"])
    if procs["bf16"].returncode == 0:
        add("bf16", root / "bf16", 1, 1, True, bf16_source["cfg"])
    (root / "dump").mkdir()
    for world, world_jobs in jobs.items():
        run_worker(world_jobs, world, root / f"jobs-{world}.json")
    dumps = {job["name"]: merged_dump(Path(job["dump"]), world) for world, js in jobs.items() for job in js}
    return {"procs": procs, "dumps": dumps}


def expansion(work, loaded, name: str) -> tuple[Path, dict, dict]:
    """The expansion's checkpoint tag folder, its manifest, and what DeepSpeed loaded from it."""
    proc = loaded["procs"][name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    dst = work["root"] / name
    tag_dir = dst / (dst / "latest").read_text().strip()
    return tag_dir, json.loads((tag_dir / "upcycle_manifest.json").read_text()), loaded["dumps"][name]


@pytest.fixture(scope="module")
def source_dump(loaded):
    return loaded["dumps"]["source"]


def assert_matches(expected: dict, dump: dict) -> None:
    assert sorted(expected) == sorted(dump["params"])
    state_keys = {"fp32", "exp_avg", "exp_avg_sq"}
    for name, tensors in expected.items():
        assert set(dump["params"][name]) & state_keys == set(tensors) & state_keys, name  # moments, or none
        for key in set(tensors) & state_keys:
            assert torch.equal(tensors[key], dump["params"][name][key]), (name, key)


@pytest.mark.parametrize("name", ["copy-1-1", "scale-2-2", "reset-2-1", "fresh-2-2"])
def test_expand_loads_in_deepspeed_with_expected_state(work, loaded, source_dump, name):
    mode = EXPANSIONS[name][3]
    tag_dir, manifest, dump = expansion(work, loaded, name)
    assert_matches(expected_state(source_dump, manifest, mode), dump)
    # routing bias: sources scaled as their softmax scores shrink (E/N), replicas noisy scaled copies
    if mode == "fresh":  # DeepSpeed loaded an optimizer without state: a new Adam's first step comes next
        assert dump["step"] == [] and manifest["options"]["allocate"] == "rank"
    for layer in manifest["layers"]:
        assert sum(layer["counts"]) == layer["num_target"] == dump["num_experts"]
        rule = manifest["options"]["allocate"]
        assert layer["counts"] == allocate_copies(layer["num_source"], layer["num_target"], layer["scores"], rule=rule)
        assert layer["route_bias_scale"] == layer["num_source"] / layer["num_target"]
        name = layer["prefix"] + GATE + ".route_bias"
        before, after = source_dump["buffers"][name] * layer["route_bias_scale"], dump["buffers"][name]
        first = {s: layer["sources"].index(s) for s in set(layer["sources"])}
        for j, s in enumerate(layer["sources"]):
            if first[s] == j:
                assert after[j] == before[s]
            else:
                assert after[j] != before[s] and abs(after[j] - before[s]) < 0.1
    assert dump["global_steps"] == source_dump["global_steps"] and dump["client"] == source_dump["client"]
    assert dump["train_step"]["params_moved"] == dump["train_step"]["params"]
    info = json.loads((tag_dir / "ds_upcycle.json").read_text())
    assert info["model"]["num_experts"] == dump["num_experts"]
    assert manifest["checksums"]["mp_rank_00_model_states.pt"]
    assert tree_digest(work["src"]) == work["digest"], "the source was modified"


def test_expand_chosen_layers_only_then_train(work, loaded, source_dump, data_cache):
    tag_dir, manifest, dump = expansion(work, loaded, "layer-1-only")
    dst = tag_dir.parent
    assert [(layer["num_source"], layer["num_target"]) for layer in manifest["layers"]] == [(4, 4), (4, 8), (4, 4),
                                                                                          (4, 4)]
    assert manifest["layers"][0]["sources"] == [0, 1, 2, 3]
    assert json.loads((tag_dir / "ds_upcycle.json").read_text())["model"]["layer_experts"] == [4, 8, 4, 4]
    assert_matches(expected_state(source_dump, manifest, "copy"), dump)
    layer0 = manifest["layers"][0]["prefix"] + GATE + ".route_bias"
    assert torch.equal(dump["buffers"][layer0], source_dump["buffers"][layer0])
    assert dump["train_step"]["params_moved"] == dump["train_step"]["params"]
    # train.py continues from it on the same layout
    cont = work["root"] / "layer-1-only-cpt"
    check_ok(run_train(tiny_run_args(work["cfg"], 2, data_cache, "--ep-size", "2", "--load", str(dst), "--save",
                                     str(cont), "--split", "cpt", "--fresh-schedule", "--eval-samples", "8",
                                     *SOURCE_MODEL),
                       num_procs=2))
    cont_tag = cont / (cont / "latest").read_text().strip()
    assert json.loads((cont_tag / "ds_upcycle.json").read_text())["model"]["layer_experts"] == [4, 8, 4, 4]


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2)])
def test_reshard_is_bit_exact(work, loaded, source_dump, world, ep):
    tag_dir, _, dump = expansion(work, loaded, f"reshard-{world}-{ep}")
    dst = tag_dir.parent
    assert_matches(source_dump["params"], dump)
    assert all(torch.equal(v, dump["buffers"][k]) for k, v in source_dump["buffers"].items())
    if (world, ep) == (2, 2):  # the source's own layout: DeepSpeed's own files, tensor for tensor
        tag = (work["src"] / "latest").read_text()
        assert_deepspeed_saves_the_same(dst / tag, work["src"] / tag)


def test_same_seed_same_bytes_and_dry_run(work):
    a, b = work["root"] / "seed-a", work["root"] / "seed-b"
    for dst in (a, b):
        assert expand_cli(str(work["src"]), str(dst), "-m", "2", "--seed", "7").returncode == 0
    def digest(d):  # the manifest records timings, everything else must be identical
        return {k: v for k, v in tree_digest(d).items() if not k.endswith("upcycle_manifest.json")}

    assert digest(a) == digest(b)
    c = work["root"] / "seed-c"
    assert expand_cli(str(work["src"]), str(c), "-m", "2", "--seed", "8").returncode == 0
    assert digest(a) != digest(c)
    dry = expand_cli(str(work["src"]), str(work["root"] / "dry"), "-m", "2", "--dry-run")
    assert dry.returncode == 0 and "MoE layer 0" in dry.stdout and "copies" in dry.stdout
    assert not (work["root"] / "dry").exists()


@pytest.mark.parametrize("args,message", [
    (["{missing}", "{dst}", "-m", "2"], "checkpoint not found"),
    (["{root}", "{dst}", "-m", "2"], "not a DeepSpeed checkpoint"),
    (["{src}", "{dst}", "--num-experts", "4"], "must be larger than the source's 4 experts"),
    (["{src}", "{dst}", "--num-experts", "5"], "num_experts 5 is not divisible by the source's ep_size (--ep-size) 2"),
    (["{src}", "{dst}", "-m", "2", "--world-size", "3"],
     "--world-size 3 is not divisible by the source's ep_size (--ep-size) 2"),
    (["{src}", "{existing}", "-m", "2"], "is not empty; pass --force"),
    (["{src}", "{dst}"], "exactly one of --num-experts and --multiplier"),
    (["{src}", "{dst}", "-m", "2", "--layers", "4"], "--layers 4: the source has 4 MoE layers (0 to 3)"),
    (["{src}", "{dst}", "-m", "2", "--layers", "one"], "--layers takes comma-separated MoE layer indices"),
    (["{src}", "{dst}", "-m", "2", "--lift-groups-after", "5"], "--lift-groups-after lifts the groups of --distinct"),
    (["{src}", "{dst}", "-m", "2", "--reinit-fraction", "1.5"], "--reinit-fraction must lie in [0, 1]"),
])
def test_bad_input_one_line_and_source_untouched(work, args, message):
    existing = work["root"] / "existing"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("mine")
    paths = {"missing": work["root"] / "missing", "dst": work["root"] / "never", "root": work["root"],
             "src": work["src"], "existing": existing}
    proc = expand_cli(*[a.format(**paths) for a in args])
    assert proc.returncode == 2
    assert "ds-upcycle: error:" in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (work["root"] / "never").exists() and (existing / "keep.txt").read_text() == "mine"
    assert tree_digest(work["src"]) == work["digest"]


def test_stock_deepspeed_script_checkpoint_expands_and_resumes(tmp_path):
    """A plain DeepSpeed MoE model with the stock gate (no routing bias, top-1 and top-2 layers)."""
    cfg = write_ds_config(tmp_path / "ds.json", stage=2, micro_batch=4)
    script = str(ROOT / "tests" / "workers" / "stock_moe.py")

    def launch(*args):
        proc = subprocess.run([*launcher(2), script, "--config", str(cfg), "--ep-size", "2", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=launch_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # "before": the state the source run trained and saved, as DeepSpeed's accessors see it
    launch("--experts", "4", "--steps", "3", "--save", str(tmp_path / "src"), "--report", str(tmp_path / "before"))
    proc = expand_cli(str(tmp_path / "src"), str(tmp_path / "dst"), "-m", "2", "--select", "uniform")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = launch("--experts", "8", "--steps", "2", "--load", str(tmp_path / "dst"), "--report", str(tmp_path / "after"))
    assert "steps 5" in out.stdout  # resumed at step 3, trained 2 more
    def merge(prefix):
        return {**json.load(open(f"{prefix}.rank0")), **json.load(open(f"{prefix}.rank1"))}

    before, after = merge(tmp_path / "before"), merge(tmp_path / "after")
    for k in range(8):  # uniform doubling: new expert k copies expert k % 4, moments included
        for suffix in ("fc1.weight", "fc2.bias"):
            new, old = after[expert_param("moe1", k, suffix)], before[expert_param("moe1", k % 4, suffix)]
            assert new == old
    router_after, router_before = after[router_weight("moe2")], before[router_weight("moe2")]
    assert router_after["fp32"][:4] == router_before["fp32"]  # source rows unchanged
    assert router_after["fp32"][4:] != router_before["fp32"]  # replicas: rows plus noise (no bias)
    assert router_after["exp_avg"][4:] == router_before["exp_avg"]
    manifest = json.loads((tmp_path / "dst" / "global_step3" / "upcycle_manifest.json").read_text())
    assert manifest["layers"][0]["router_noise_on"].startswith("router weight rows")
    # No transformers class is known to compute a stock gate's model: export says why, in one line.
    refused = CliRunner().invoke(cli_main, ["export", str(tmp_path / "src"), str(tmp_path / "hf")])
    assert refused.exit_code != 0 and "not written by ds-upcycle" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


def test_bf16_zero2_checkpoint_expands_and_loads(work, loaded):
    """bf16 runs write bf16_zero_pp_rank_* files; module weights are the fp32 master cast to bf16."""
    tag_dir, manifest, dump = expansion(work, loaded, "bf16")
    assert tag_dir.name == "global_step3"
    assert sorted(p.name for p in tag_dir.glob("*optim_states.pt")) == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert_matches(expected_state(loaded["dumps"]["bf16-source"], manifest, "copy"), dump)
    for name, tensors in dump["params"].items():
        assert tensors["module"].dtype == torch.bfloat16
        assert torch.equal(tensors["module"], tensors["fp32"].to(torch.bfloat16)), name
    assert dump["train_step"]["params_moved"] > 0
