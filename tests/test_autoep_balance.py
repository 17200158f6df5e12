"""Loss-free balancing in a stock DeepSpeed AutoEP script (ds_upcycle.moe.autoep), on CPU.

The script (tests/workers/autoep_stock.py) trains a tiny transformers Qwen3-MoE through AutoEP's
qwen3_moe preset, with gradient accumulation 2 and an eval pass between steps. Oracle: the experts
the routers chose, counted by the script's own forward hooks on the routers and summed over the
processes; from them the bias after every step is written out by hand (b += u * sign(mean - load)).
"""

import numpy as np
import pytest

from conftest import run_autoep_stock as run_stock


def expected_bias(record, step_size):
    loads = np.array(record["loads"])  # [steps, layers, experts]
    return np.array(record["bias_at_start"]) + np.cumsum(step_size * np.sign(loads.mean(-1, keepdims=True) - loads), 0)


@pytest.mark.slow
def test_bias_follows_the_global_load_and_travels_in_the_checkpoint(tmp_path):
    record = run_stock(tmp_path / "run.json", "--balance", "0.01", "--steps", "6", "--save", str(tmp_path / "ckpt"),
                       procs=2)
    assert record["world"] == 2 and record["bias_at_start"] == [[0.0] * 8] * 2
    # every step's global batch: 2 processes x 2 micro-batches x 32 tokens x top-2, eval passes not counted
    assert all(sum(layer) == 256 for step in record["loads"] for layer in step)
    np.testing.assert_allclose(np.array(record["bias"]), expected_bias(record, 0.01), atol=1e-6)
    assert np.abs(np.array(record["bias"][-1])).max() > 0.01  # it moved, more than one step's worth
    final = np.array(record["loads"][-1])
    np.testing.assert_allclose([layer["shares"] for layer in record["last_load"]],
                               final / final.sum(-1, keepdims=True), atol=1e-6)
    # The bias is in the saved module state, and a new job that attaches first loads it back.
    assert list(record["saved_bias"].values()) == record["bias"][-1]
    resumed = run_stock(tmp_path / "resumed.json", "--balance", "0.01", "--load", str(tmp_path / "ckpt"),
                        "--steps", "0", procs=2)
    assert resumed["bias_at_start"] == record["bias"][-1]


@pytest.mark.slow
def test_loads_become_even(tmp_path):
    """Tokens from 4 ids only and LR 0: the routers keep preferring a few experts, which only the bias can change."""
    args = ["--steps", "40", "--token-ids", "4", "--lr", "0"]
    plain = np.array(run_stock(tmp_path / "plain.json", *args)["loads"])
    balanced = np.array(run_stock(tmp_path / "balanced.json", *args, "--balance", "0.003")["loads"])

    def late_cv(loads):  # coefficient of variation of the expert loads, mean over the last 10 steps and the layers
        return float((loads.std(-1) / loads.mean(-1))[-10:].mean())

    # measured: 0.73 without balancing, 0.43 with it
    assert late_cv(balanced) < 0.75 * late_cv(plain), (late_cv(balanced), late_cv(plain))
