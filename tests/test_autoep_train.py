"""train.py on DeepSpeed AutoEP layers (moe_dispatch=autoep) against the legacy layer, the oracle.

The same model config and seed give the same initial weights in either layout (model.init_weights
draws stacked slices under the legacy names), so with fp32 and ZeRO-2 the two runs must agree step
by step: losses, expert loads (hence the loss-free bias updates) and validation losses, on one
process and on two with ep_size 2, where AutoEP's own all-to-all carries the rows.
"""

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import check_ok, run_train, tiny_run_args, write_ds_config
from ds_upcycle.checkpoint import read_checkpoint, read_metrics
from ds_upcycle.config import ModelConfig
from ds_upcycle.errors import UserError
from ds_upcycle.model import Transformer
from ds_upcycle.moe.names import moe_prefix, router_bias

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
    loads = [ffn.moe.tokens_per_expert for ffn in (b.ffn for b in stacked.layers) if hasattr(ffn, "moe")]
    assert [load.tolist() for load in loads] == [router.route_load.tolist() for router in legacy.routers]


@pytest.mark.parametrize("field, value, words", [("aux_loss_coef", 0.01, "no auxiliary balance loss"),
                                                 ("route_groups", ((0, 0, 1, 1, 2, 2, 3, 3),) * 2, "no routing groups")])
def test_autoep_refuses_what_its_router_cannot_compute(field, value, words):
    with pytest.raises(UserError, match=words):
        SMALL.replace(moe_dispatch="autoep", **{field: value})


def train_args(tmp_path, data_cache, dispatch: str, ep_size: int) -> list[str]:
    cfg = write_ds_config(tmp_path / "z2.json", stage=2, micro_batch=4)
    return tiny_run_args(cfg, 8, data_cache, "--eval-interval", "4", "--save-interval", "4", "--ep-size", str(ep_size),
                         "--set", f"moe_dispatch={dispatch}", "--save", str(tmp_path / dispatch))


def saved_biases(tag_dir, autoep: bool) -> list[float]:
    """Every MoE layer's selection bias in the checkpoint's module state, layer after layer."""
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    names = [f"{moe_prefix(i)}.expert_bias" if autoep else router_bias(moe_prefix(i)) for i in range(4)]
    return [b for name in names for b in module[name].tolist()]


@pytest.mark.slow
@pytest.mark.parametrize("procs, ep_size", [(0, 1), (2, 2)])
def test_train_py_on_autoep_layers_trains_and_resumes_as_the_legacy_layer(tmp_path, data_cache, procs, ep_size):
    runs = {}
    for dispatch in ("legacy", "autoep"):
        check_ok(run_train(train_args(tmp_path, data_cache, dispatch, ep_size), num_procs=procs))
        runs[dispatch] = tmp_path / dispatch
    legacy, autoep = (read_metrics(runs[d] / "metrics.jsonl") for d in ("legacy", "autoep"))
    assert [r["loss"] for r in autoep] == pytest.approx([r["loss"] for r in legacy], rel=1e-5)
    val = {d: [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
           for d, records in (("legacy", legacy), ("autoep", autoep))}
    assert [s for s, _ in val["autoep"]] == [s for s, _ in val["legacy"]] == [4, 8]
    assert [v for _, v in val["autoep"]] == pytest.approx([v for _, v in val["legacy"]], rel=1e-5)
    assert [r["load"] for r in autoep] == [r["load"] for r in legacy]   # the same experts chosen, every step
    # The checkpoint is AutoEP's layout (DeepSpeed wrote it), with the selection bias in the module state.
    tag = runs["autoep"] / "global_step8"
    saved = read_checkpoint(tag)
    assert all(layer.autoep for layer in saved.moe_layers) and saved.ep_size == ep_size
    model_file = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert [entry["module_path"] for entry in model_file["ds_autoep_layers"]] == [moe_prefix(i) for i in range(4)]
    expected = saved_biases(runs["legacy"] / "global_step8", autoep=False)
    assert saved_biases(tag, autoep=True) == pytest.approx(expected, abs=1e-7)
    assert max(map(abs, expected)) > 0   # balancing moved them
    if procs:  # Pretend the AutoEP run died after step 4: the same command resumes it as if uninterrupted.
        full = autoep
        (runs["autoep"] / "latest").write_text("global_step4")
        shutil.rmtree(runs["autoep"] / "global_step8")
        check_ok(run_train(train_args(tmp_path, data_cache, "autoep", ep_size), num_procs=procs))
        resumed = read_metrics(runs["autoep"] / "metrics.jsonl")
        assert [r["step"] for r in resumed] == list(range(1, 9))
        assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-6)
        assert [r["load"] for r in resumed] == [r["load"] for r in full]


@pytest.mark.slow
def test_a_checkpoint_keeps_its_expert_layout(tmp_path, data_cache):
    """The two layouts name their weights differently: switching dispatch on --load is refused in one line."""
    cfg = write_ds_config(tmp_path / "z2.json", stage=2, micro_batch=4)
    check_ok(run_train(tiny_run_args(cfg, 2, data_cache, "--save", str(tmp_path / "legacy"))))
    proc = run_train(tiny_run_args(cfg, 2, data_cache, "--load", str(tmp_path / "legacy"),
                                   "--set", "moe_dispatch=autoep", "--save", str(tmp_path / "autoep")))
    assert proc.returncode == 2 and "moe_dispatch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "autoep").exists()

