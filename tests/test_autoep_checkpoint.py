"""`ds-upcycle expand` on DeepSpeed AutoEP checkpoints, resumed by a stock AutoEP script, on CPU.

The client is tests/workers/autoep_stock.py: a transformers Qwen3-MoE under AutoEP's qwen3_moe
preset (and a Mixtral under its mixtral preset), nothing of ds-upcycle's model in it, saving and loading with stock DeepSpeed. Oracle:
what DeepSpeed's own safe_get_full_* accessors return, in the source job before it saves and in
the resumed job after `engine.load_checkpoint`: every expert's fp32 master weight and Adam moments
must be its source expert's (as the manifest names it), the routers' rows the source rows; for a
reshard (-m 1) the resumed job must also train exactly as the source does on its own layout.
"""

import json

import pytest
import torch

from conftest import check_ok, expand_cli, run_autoep_stock

pytestmark = pytest.mark.slow


def merged_dump(path, ranks):
    state = {}
    for rank in range(ranks):
        state.update(torch.load(f"{path}.rank{rank}"))
    return state


def assert_is_expansion(expanded: dict, source: dict, manifest: dict) -> None:
    """Every tensor of the resumed job equals its source's as the manifest's plan says."""
    sources = [layer["sources"] for layer in manifest["layers"]]
    for key, state in expanded.items():
        layer, name, *expert = key
        if name == "router":
            want = {k: t[torch.tensor(sources[layer])] for k, t in source[(layer, "router")].items()}
        else:
            want = source[(layer, name, sources[layer][expert[0]])]
        assert set(state) == {"fp32", "exp_avg", "exp_avg_sq"}
        for k, tensor in state.items():
            assert torch.equal(tensor, want[k]), (key, k)


@pytest.fixture(scope="module")
def autoep_source(tmp_path_factory):
    """3 steps of the stock script on 2 processes, autoep_size 2, ZeRO-2 fp32, saved after its dump; then
    2 steps more, the losses a job resumed from the checkpoint on this layout takes."""
    root = tmp_path_factory.mktemp("autoep_source")
    record = run_autoep_stock(root / "run.json", "--steps", "3", "--save", str(root / "ckpt"), "--dump",
                              str(root / "dump"), "--continue-steps", "2", procs=2)
    return {"ckpt": root / "ckpt", "dump": merged_dump(root / "dump", 2), "record": record}


def test_expansion_resumes_exactly_on_the_same_and_on_another_layout(autoep_source, tmp_path):
    for procs, layout in ((2, ()), (1, ("--world-size", "1", "--ep-size", "1"))):
        out = tmp_path / f"x{procs}"
        check_ok(expand_cli(str(autoep_source["ckpt"]), str(out), "-m", "2", "--select", "uniform",
                            "--router-noise", "0", *layout))
        manifest = json.loads((out / "t" / "upcycle_manifest.json").read_text())
        resumed = run_autoep_stock(tmp_path / f"r{procs}.json", "--load", str(out), "--num-experts", "16", "--steps",
                                   "1", "--dump", str(tmp_path / f"d{procs}"), "--save", str(tmp_path / f"s{procs}"),
                                   procs=procs)
        expanded = merged_dump(tmp_path / f"d{procs}", procs)
        assert len([k for k in expanded if k[1] == "w1"]) == 2 * 16
        assert_is_expansion(expanded, autoep_source["dump"], manifest)
        assert all(loss == loss for loss in resumed["losses"])  # it trains on
        # The layout entries are what stock DeepSpeed itself saves for the 16-expert job.
        ours = torch.load(out / "t" / "mp_rank_00_model_states.pt", weights_only=False)
        theirs = torch.load(tmp_path / f"s{procs}" / "t" / "mp_rank_00_model_states.pt", weights_only=False)
        for key in ("ds_autoep_layers", "universal_checkpoint_info", "param_shapes", "num_experts", "buffer_names"):
            assert ours[key] == theirs[key], key
        assert list(ours["module"]) == list(theirs["module"])


def test_reshard_to_another_autoep_size_trains_as_the_source_does(autoep_source, tmp_path):
    """DeepSpeed's direct reload at another autoep_size puts optimizer state on the wrong experts;
    expand -m 1 is exact: same state, and the losses the source job takes when it goes on, on its own layout."""
    out = tmp_path / "ep1"
    check_ok(expand_cli(str(autoep_source["ckpt"]), str(out), "-m", "1", "--ep-size", "1"))
    resharded = run_autoep_stock(tmp_path / "ep1.json", "--load", str(out), "--autoep-size", "1", "--steps", "2",
                                 "--dump", str(tmp_path / "d"), procs=2)
    for rank in range(2):  # with autoep_size 1 every process holds every expert
        state = torch.load(tmp_path / f"d.rank{rank}")
        assert len([k for k in state if k[1] == "w1"]) == 2 * 8
        for key, tensors in state.items():
            for k, tensor in tensors.items():
                assert torch.equal(tensor, autoep_source["dump"][key][k]), (rank, key, k)
    own = autoep_source["record"]["continued_losses"]
    assert len(own) == 4
    assert resharded["losses"] == pytest.approx(own, rel=1e-6, abs=0)


# (the stock script's family and precision, expand's options, whether the routers are compared too)
VARIANTS = {
    # AutoEP's qwen3_moe preset, ZeRO-1 bf16; grad_sq from the AutoEP optimizer state, the default
    # noise on the replicas' router rows (no bias to put it on): the experts are compared
    "qwen3-zero1-bf16": (("--zero-stage", "1", "--bf16"), (), False),
    # AutoEP's mixtral preset (a transformers Mixtral: MoE block `model.layers.<i>.mlp`, router `gate`),
    # no ZeRO, fp32; uniform copies without noise: the routers' rows are the source rows
    "mixtral-no-zero-fp32": (("--family", "mixtral", "--zero-stage", "0"), ("--select", "uniform", "--router-noise", "0"),
                             True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_expansion_to_one_process_from_other_presets_and_stages(tmp_path, variant):
    """8 -> 16 experts from 2 processes to 1, resumed by the stock script: every expert's state is its
    source's, and the layout entries are what stock DeepSpeed itself saves for the 16-expert job."""
    script_args, expand_args, with_router = VARIANTS[variant]
    root = tmp_path
    run_autoep_stock(root / "run.json", "--steps", "2", "--save", str(root / "ckpt"), "--dump", str(root / "dump"),
                     *script_args, procs=2)
    out = root / "x"
    check_ok(expand_cli(str(root / "ckpt"), str(out), "-m", "2", "--world-size", "1", "--ep-size", "1", *expand_args))
    resumed = run_autoep_stock(root / "r.json", "--load", str(out), "--num-experts", "16", "--steps", "1", "--dump",
                               str(root / "d"), "--save", str(root / "s"), *script_args)
    manifest = json.loads((out / "t" / "upcycle_manifest.json").read_text())
    if not expand_args:
        assert manifest["scores"] == {"from": "adam state"}  # grad_sq from the AutoEP optimizer state
    expanded = merged_dump(root / "d", 1)
    assert len([k for k in expanded if k[1] == "w1"]) == 2 * 16
    assert_is_expansion({k: v for k, v in expanded.items() if with_router or k[1] != "router"},
                        merged_dump(root / "dump", 2), manifest)
    assert all(loss == loss for loss in resumed["losses"])  # it trains on
    module = torch.load(out / "t" / "layer_0_expert_9_mp_rank_00_model_states.pt")
    assert {t.dtype for t in module.values()} == {torch.bfloat16 if "--bf16" in script_args else torch.float32}
    ours = torch.load(out / "t" / "mp_rank_00_model_states.pt", weights_only=False)
    theirs = torch.load(root / "s" / "t" / "mp_rank_00_model_states.pt", weights_only=False)
    for key in ("ds_autoep_layers", "universal_checkpoint_info", "param_shapes", "num_experts", "buffer_names"):
        assert ours[key] == theirs[key], key
    assert list(ours["module"]) == list(theirs["module"])


def test_refusals_name_the_problem(autoep_source, tmp_path):
    model_file = "mp_rank_00_model_states.pt"
    cases = {
        "placement": lambda m: m["ds_autoep_layers"][0]["expert_placement"]["ranks"].reverse(),
        "unknown module key": lambda m: m["module"].update({"model.layers.1.mlp.router.gate.bias": torch.zeros(8)}),
        "router buffer": lambda m: (m["buffer_names"].append("model.layers.1.mlp.router.e_score_correction_bias"),
                                    m["module"].update({"model.layers.1.mlp.router.e_score_correction_bias":
                                                        torch.zeros(8)})),
        "no metadata": lambda m: m.update({"ds_autoep_layers": None}),
    }
    expected = {"placement": "only the uniform contiguous expert placement is supported",
                "unknown module key": "module weights do not match",
                "router buffer": "only routers with a weight alone",
                "no metadata": "no ds_autoep_layers entry"}
    for name, change in cases.items():
        broken = tmp_path / name.replace(" ", "_")
        (broken / "t").mkdir(parents=True)
        for f in autoep_source["ckpt"].joinpath("t").iterdir():
            (broken / "t" / f.name).symlink_to(f)
        (broken / "latest").write_text("t")
        (broken / "t" / model_file).unlink()
        model = torch.load(autoep_source["ckpt"] / "t" / model_file, weights_only=False)
        change(model)
        torch.save(model, broken / "t" / model_file)
        result = expand_cli(str(broken), str(tmp_path / f"out_{name}"), "-m", "2")
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert expected[name] in result.stderr, result.stderr
        assert not (tmp_path / f"out_{name}").exists()
