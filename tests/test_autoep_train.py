"""train.py on DeepSpeed AutoEP layers (moe_dispatch=autoep) against the legacy layer, the oracle.

The same model config and seed give the same initial weights in either layout (model.init_weights
draws stacked slices under the legacy names), so with fp32 and ZeRO-2 the two runs must agree step
by step: losses, expert loads (hence the loss-free bias updates) and validation losses, on one
process and on two with ep_size 2, where AutoEP's own all-to-all carries the rows.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import (check_ok, cli_in_process, expand_cli, run_train, tiny_run_args, train_refusal,
                      write_ds_config)
from ds_upcycle.checkpoint import named_param_states, read_checkpoint, read_metrics
from ds_upcycle.config import ModelConfig
from ds_upcycle.errors import UserError
from ds_upcycle.model import Transformer
from ds_upcycle.moe.live import live_moe_layers
from ds_upcycle.moe.names import moe_prefix, router_bias
from ds_upcycle.moe.stacked import stack_expert_slices
from ds_upcycle.trained import load_model
from ds_upcycle.training.loop import engine_config

SMALL = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=48,
                    expert_ffn_dim=24, num_experts=8, top_k=2, moe_layer_freq=2)
STACKED_OF_LEGACY = {"w_gate.weight": "w1", "w_down.weight": "w2", "w_up.weight": "w3"}


def forward_backward(cfg: ModelConfig, tokens: torch.Tensor):
    model = Transformer(cfg, seed=3).train()
    logits, _ = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return model, logits.detach()


@pytest.mark.parametrize("changes", [{}, {"score_func": "sigmoid", "top_k": 1}, {"top_k": 3, "route_norm": False}])
def test_stacked_block_starts_from_and_computes_what_the_legacy_layer_does(changes):
    tokens = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    legacy, legacy_logits = forward_backward(SMALL.replace(**changes), tokens)
    stacked, stacked_logits = forward_backward(SMALL.replace(moe_dispatch="autoep", **changes), tokens)
    torch.testing.assert_close(stacked_logits, legacy_logits, rtol=1e-5, atol=1e-6)
    for name, param in legacy.named_parameters():
        if ".deepspeed_moe.experts." in name:   # expert e's weight is slice e of the stacked tensor
            prefix, rest = name.split(".deepspeed_moe.experts.deepspeed_experts.")
            expert, weight = rest.split(".", 1)
            twin = stacked.get_parameter(f"{prefix}.experts.{STACKED_OF_LEGACY[weight]}")[int(expert)]
            twin_grad = stacked.get_parameter(f"{prefix}.experts.{STACKED_OF_LEGACY[weight]}").grad[int(expert)]
        elif ".deepspeed_moe.gate.wg." in name:
            twin = stacked.get_parameter(name.replace(".deepspeed_moe.gate.wg.", ".router.gate."))
            twin_grad = twin.grad
        else:
            twin = stacked.get_parameter(name)
            twin_grad = twin.grad
        assert torch.equal(twin, param), name
        torch.testing.assert_close(twin_grad, param.grad, rtol=1e-4, atol=1e-7, msg=name)
    loads = [layer.loads.tolist() for layer in live_moe_layers(stacked)]
    assert loads == [router.route_load.tolist() for router in legacy.routers]


@pytest.mark.parametrize("field, value, words", [("aux_loss_coef", 0.01, "no auxiliary balance loss"),
                                                 ("route_groups", ((0, 0, 1, 1, 2, 2, 3, 3),) * 2, "no routing groups")])
def test_autoep_refuses_what_its_router_cannot_compute(field, value, words):
    with pytest.raises(UserError, match=words):
        SMALL.replace(moe_dispatch="autoep", **{field: value})


def test_the_grouped_dispatch_is_gone_and_its_runs_read_as_legacy():
    """moe_dispatch=grouped shared the legacy layer's weights and checkpoints; AutoEP replaced it."""
    with pytest.raises(UserError, match="moe_dispatch=grouped is gone"):
        SMALL.replace(moe_dispatch="grouped")
    assert ModelConfig.from_dict({**SMALL.to_dict(), "moe_dispatch": "grouped"}).moe_dispatch == "legacy"


def test_the_deepspeed_config_names_our_blocks_to_autoep_and_keeps_the_users_knobs():
    user = {"train_micro_batch_size_per_gpu": 4, "expert_parallel": {"use_grouped_mm": False, "autoep_size": 8}}
    section = engine_config(user, SMALL.replace(moe_dispatch="autoep"), ep_size=2)["expert_parallel"]
    assert section["enabled"] and section["autoep_size"] == 2 and not section["use_grouped_mm"]
    assert (section["moe_layer_pattern"], section["top_k"], section["score_func"]) == (r"layers\.\d+\.ffn\.moe", 2,
                                                                                      "softmax")
    assert engine_config({"train_micro_batch_size_per_gpu": 4}, SMALL, 1) == {"train_micro_batch_size_per_gpu": 4}
    with pytest.raises(UserError, match="drop preset_model"):
        engine_config({"expert_parallel": {"preset_model": "qwen3_moe"}}, SMALL.replace(moe_dispatch="autoep"), 1)
    with pytest.raises(UserError, match="moe_dispatch=autoep"):   # AutoEP would find no block of ours to replace
        engine_config({"expert_parallel": {"enabled": True}}, SMALL, 1)


def train_args(out, data_cache, dispatch: str, ep_size: int, *extra: str) -> list[str]:
    cfg = write_ds_config(out.parent / "z2.json", stage=2, micro_batch=4)
    return tiny_run_args(cfg, 8, data_cache, "--eval-interval", "4", "--save-interval", "4", "--ep-size", str(ep_size),
                         "--set", f"moe_dispatch={dispatch}", "--save", str(out), *extra)


def saved_biases(tag_dir, autoep: bool) -> list[float]:
    """Every MoE layer's selection bias in the checkpoint's module state, layer after layer."""
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    names = [f"{moe_prefix(i)}.expert_bias" if autoep else router_bias(moe_prefix(i)) for i in range(4)]
    return [b for name in names for b in module[name].tolist()]


def check_same_training(legacy_dir, autoep_dir, ep_size: int) -> None:
    legacy, autoep = (read_metrics(d / "metrics.jsonl") for d in (legacy_dir, autoep_dir))
    assert [r["loss"] for r in autoep] == pytest.approx([r["loss"] for r in legacy], rel=1e-5)
    val = {d: [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
           for d, records in (("legacy", legacy), ("autoep", autoep))}
    assert [s for s, _ in val["autoep"]] == [s for s, _ in val["legacy"]] and val["legacy"]
    assert [v for _, v in val["autoep"]] == pytest.approx([v for _, v in val["legacy"]], rel=1e-5)
    assert [r["load"] for r in autoep] == [r["load"] for r in legacy]   # the same experts chosen, every step
    # The checkpoint is AutoEP's layout (DeepSpeed wrote it), with the selection bias in the module state.
    tag = autoep_dir / (autoep_dir / "latest").read_text().strip()
    saved = read_checkpoint(tag)
    assert all(layer.autoep for layer in saved.moe_layers) and saved.ep_size == ep_size
    model_file = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert [entry["module_path"] for entry in model_file["ds_autoep_layers"]] == [moe_prefix(i) for i in range(4)]
    expected = saved_biases(legacy_dir / tag.name, autoep=False)
    assert saved_biases(tag, autoep=True) == pytest.approx(expected, abs=1e-7)
    assert max(map(abs, expected)) > 0   # balancing moved them


@pytest.fixture(scope="module")
def twins(tmp_path_factory, data_cache):
    """The same model trained 8 steps in one process on either layout."""
    root = tmp_path_factory.mktemp("twins")
    for dispatch in ("legacy", "autoep"):
        check_ok(run_train(train_args(root / dispatch, data_cache, dispatch, 1)))
    return root


@pytest.mark.slow
def test_train_py_on_autoep_layers_trains_as_the_legacy_layer(twins):
    check_same_training(twins / "legacy", twins / "autoep", ep_size=1)


@pytest.mark.slow
def test_with_expert_parallelism_and_after_a_resume(tmp_path, data_cache):
    """2 processes, ep_size 2: AutoEP's all-to-all carries the rows; a run killed after step 4 resumes
    as if uninterrupted."""
    for dispatch in ("legacy", "autoep"):
        check_ok(run_train(train_args(tmp_path / dispatch, data_cache, dispatch, 2), num_procs=2))
    check_same_training(tmp_path / "legacy", tmp_path / "autoep", ep_size=2)
    run = tmp_path / "autoep"
    # DeepSpeed's own universal conversion reads the checkpoint; its fp32 masters and Adam moments
    # are what ds-upcycle's reader finds, parameter by parameter (experts stacked in id order).
    universal = tmp_path / "universal"
    check_ok(subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(run / "global_step8"), "--output_folder", str(universal)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"}))
    ours = named_param_states(read_checkpoint(run / "global_step8"))
    params = [p.name for p in (universal / "zero").iterdir() if (p / "exp_avg.pt").exists()]
    assert f"{moe_prefix(0)}.experts.w1" in params and len(params) == len(stack_expert_slices(
        {name: state.fp32 for name, state in ours.items()}))
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        expected = stack_expert_slices({name: getattr(state, kind) for name, state in ours.items()})
        for name in params:
            got = torch.load(universal / "zero" / name / f"{kind}.pt", weights_only=False)["param"]
            assert torch.equal(got, expected[name]), (kind, name)
    full = read_metrics(run / "metrics.jsonl")
    (run / "latest").write_text("global_step4")
    shutil.rmtree(run / "global_step8")
    check_ok(run_train(train_args(run, data_cache, "autoep", 2), num_procs=2))
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-6)
    assert [r["load"] for r in resumed] == [r["load"] for r in full]


@pytest.mark.slow
def test_an_autoep_checkpoint_expands_continues_scores_and_exports_as_its_legacy_twin(twins, tmp_path, data_cache):
    """expand 4 -> 8 onto 2 processes with ep_size 2, continue there (copy diagnostics at every
    evaluation), score the experts on the engine, rebuild the model in one process and export it:
    each the same as for the legacy twin."""
    for dispatch in ("legacy", "autoep"):
        check_ok(expand_cli(str(twins / dispatch), str(tmp_path / f"{dispatch}-x2"), "-m", "2",
                         "--world-size", "2", "--ep-size", "2"))
        check_ok(run_train(train_args(tmp_path / f"{dispatch}-cpt", data_cache, dispatch, 2, "--load",
                                      str(tmp_path / f"{dispatch}-x2"), "--fresh-schedule"), num_procs=2))
        check_ok(run_train(["--deepspeed_config", str(tmp_path / "z2.json"), "--load", str(twins / dispatch),
                            "--score-experts", str(tmp_path / f"{dispatch}.scores.json"), "--score-batches", "2",
                            "--data-cache", str(data_cache)]))
    legacy, autoep = (read_metrics(tmp_path / f"{d}-cpt" / "metrics.jsonl") for d in ("legacy", "autoep"))
    assert [r["loss"] for r in autoep] == pytest.approx([r["loss"] for r in legacy], rel=1e-5)
    copies = [(r["copies"], s["copies"]) for r, s in zip(legacy, autoep) if "copies" in r]
    assert copies and all(len(a) == len(b) == 4 for a, b in copies)
    for a, b in copies:
        for la, lb in zip(a, b):
            assert lb["sibling_distance"] == pytest.approx(la["sibling_distance"], rel=1e-4, abs=1e-7)
            assert lb["cross_distance"] == pytest.approx(la["cross_distance"], rel=1e-4)
            assert lb["co_selected"] == la["co_selected"]
    scores = {d: json.loads((tmp_path / f"{d}.scores.json").read_text())["layers"] for d in ("legacy", "autoep")}
    assert scores["autoep"].keys() == scores["legacy"].keys()
    for layer, rules in scores["legacy"].items():
        for rule, values in rules.items():
            assert scores["autoep"][layer][rule] == pytest.approx(values, rel=1e-5), (layer, rule)
    # One process, no DeepSpeed engine: the stacked block computes what AutoEP's layer trained.
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {d: load_model(tmp_path / f"{d}-cpt").model(tokens)[0] for d in ("legacy", "autoep")}
    torch.testing.assert_close(logits["autoep"], logits["legacy"], rtol=1e-4, atol=1e-5)
    exported = {}
    for d in ("legacy", "autoep"):
        check_ok(cli_in_process("export", str(tmp_path / f"{d}-cpt"), str(tmp_path / f"{d}-hf")))
        exported[d] = load_file(next((tmp_path / f"{d}-hf").glob("*.safetensors")))
    assert exported["autoep"].keys() == exported["legacy"].keys()
    for name, tensor in exported["legacy"].items():
        torch.testing.assert_close(exported["autoep"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_checkpoint_keeps_its_expert_layout(twins, tmp_path, data_cache, monkeypatch):
    """The two layouts name their weights differently: switching dispatch on --load is refused in one
    line, before the processes meet."""
    cfg = write_ds_config(tmp_path / "z2.json", stage=2, micro_batch=4)
    args = tiny_run_args(cfg, 2, data_cache, "--load", str(twins / "legacy"), "--set", "moe_dispatch=autoep",
                         "--save", str(tmp_path / "autoep"))
    proc = train_refusal(args, monkeypatch)
    assert proc.returncode == 2 and proc.stderr.startswith("train.py: error: ") and "moe_dispatch" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "autoep").exists()

