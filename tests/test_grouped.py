"""moe_dispatch=grouped against the legacy layer (DeepSpeed's MOELayer), the oracle: the same weights
and routing give the same outputs, auxiliary loss, gradients and load counts, on one process and
with expert parallelism."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, check_ok, free_port, run_train, tiny_run_args, write_ds_config

from ds_upcycle.config import ModelConfig
from ds_upcycle.model import Transformer

SMALL = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=48,
                    expert_ffn_dim=24, num_experts=8, top_k=2, moe_layer_freq=2, aux_loss_coef=0.01)


def loss_and_grads(cfg: ModelConfig, tokens: torch.Tensor):
    model = Transformer(cfg, seed=3).train()
    logits, aux = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + aux
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    loads = [router.route_load.clone() for router in model.routers]
    return logits.detach(), aux.detach(), grads, loads


@pytest.mark.parametrize("changes", [{}, {"score_func": "sigmoid", "top_k": 1},
                                     {"route_groups": ((0, 0, 1, 1, 2, 2, 3, 3),) * 2}])
def test_grouped_dispatch_equals_the_legacy_layer(changes):
    tokens = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    legacy = loss_and_grads(SMALL.replace(**changes), tokens)
    grouped = loss_and_grads(SMALL.replace(moe_dispatch="grouped", **changes), tokens)
    torch.testing.assert_close(grouped[0], legacy[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped[1], legacy[1])
    assert grouped[2].keys() == legacy[2].keys()
    for name in legacy[2]:
        torch.testing.assert_close(grouped[2][name], legacy[2][name], rtol=1e-4, atol=1e-7, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(grouped[3], legacy[3]))
    # an expert nobody chose gets a zero gradient on both paths, not a missing one
    assert any(float(g.abs().sum()) > 0 for n, g in grouped[2].items() if "deepspeed_experts" in n)


def test_bf16_grouped_dispatch_is_within_bf16_rounding_of_the_legacy_layer():
    tokens = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    outputs = []
    for dispatch in ("legacy", "grouped"):
        model = Transformer(SMALL.replace(moe_dispatch=dispatch), seed=3).to(torch.bfloat16).eval()
        with torch.no_grad():
            outputs.append(model(tokens)[0].float())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0.05, atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("procs, ep_size", [(2, 2), (2, 1)])
def test_grouped_dispatch_equals_the_legacy_layer_across_processes(tmp_path, procs, ep_size):
    """With ep_size 2 the grouped rows cross ranks in a variable-size all-to-all (the ranks hold
    different numbers of tokens); with ep_size 1 each rank computes alone."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    check_ok(subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs),
                             "--master_port", str(free_port()), str(ROOT / "tests" / "workers" / "dispatch_worker.py"),
                             "--ep-size", str(ep_size), str(tmp_path / "out")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300))
    for rank in range(procs):
        result = torch.load(tmp_path / f"out.rank{rank}.pt", weights_only=False)
        legacy, grouped = result["legacy"], result["grouped"]
        torch.testing.assert_close(grouped["logits"], legacy["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped["aux"], legacy["aux"])
        assert grouped["grads"].keys() == legacy["grads"].keys()
        for name, grad in legacy["grads"].items():
            torch.testing.assert_close(grouped["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
        assert all(torch.equal(a, b) for a, b in zip(grouped["loads"], legacy["loads"]))


@pytest.mark.slow
def test_train_py_trains_the_same_on_either_dispatch(tmp_path, data_cache):
    """2 processes, ep_size 2, ZeRO-2, loss-free balancing: the loss curves agree step by step."""
    cfg = write_ds_config(tmp_path / "z2.json", micro_batch=4)
    curves = {}
    for dispatch in ("legacy", "grouped"):
        out = tmp_path / dispatch
        check_ok(run_train(tiny_run_args(cfg, 4, data_cache, "--eval-samples", "8", "--ep-size", "2",
                                         "--set", f"moe_dispatch={dispatch}", "--save", str(out)), num_procs=2))
        curves[dispatch] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert curves["grouped"] == pytest.approx(curves["legacy"], rel=1e-5)
    assert curves["legacy"][-1] < curves["legacy"][0]
