"""`ds-upcycle expand --calibration-data`: utility scores from exact gradients on calibration batches.

The oracle is plain autograd: the same batches through the model (built directly, or loaded with
trained.load_model), `loss.backward()` on every parameter, expert gradients picked by name and
averaged over batches by hand.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import expand_cli, tree_digest

from ds_upcycle.checkpoint import read_checkpoint
from ds_upcycle.config import ModelConfig
from ds_upcycle.data.config import DataConfig
from ds_upcycle.data.prepare import prepare_data
from ds_upcycle.errors import UserError
from ds_upcycle.trained import RunData, load_model
from ds_upcycle.model import Transformer
from ds_upcycle.moe.names import GATE, expert_param, split_expert_param
from ds_upcycle.trained.calibration_data import calibration_data
from ds_upcycle.trained.gradients import expert_gradient_stats
from ds_upcycle.trained.scores import FISHER_EPS, GRADIENT_RULES, ExpertScores
from ds_upcycle.upcycle.calibration import calibrate
from ds_upcycle.upcycle.config import ExpandConfig
from ds_upcycle.upcycle.expand import expand_checkpoint
from ds_upcycle.upcycle.operator import allocate_copies
from ds_upcycle.upcycle.split import router_input_directions

SMALL = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=48,
                    expert_ffn_dim=24, num_experts=4, top_k=2, moe_layer_freq=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two threads on a shared two-core machine make small backward passes 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def direct_stats(model, batches):
    """{(prefix, expert, name): (mean grad, mean squared grad, weight)} by plain backward()."""
    sums = {}
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        logits, _ = model(inputs)
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        for name, p in model.named_parameters():
            key = split_expert_param(name)
            if key is not None:
                grad = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                g, g2 = sums.get(key, (0, 0))
                sums[key] = (g + grad, g2 + grad * grad)
    n = len(batches)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    return {key: (g / n, g2 / n, weights[expert_param(*key)])
            for key, (g, g2) in sums.items()}


def direct_score(rule, entries):
    """Score of one expert from its [(g, g2, w)], written out from the paper's definitions:
    sum g2, |sum w g|, ||w||, sum g^2 / (g2 + eps)."""
    if rule == "grad_sq":
        return sum(float(g2.double().sum()) for g, g2, w in entries)
    if rule == "saliency":
        return abs(sum(float((w.double() * g.double()).sum()) for g, g2, w in entries))
    if rule == "weight_norm":
        return sum(float(w.double().square().sum()) for g, g2, w in entries) ** 0.5
    return sum(float((g.double().square() / (g2.double() + FISHER_EPS)).sum()) for g, g2, w in entries)


def assert_match_direct(stats, direct):
    assert {(p, e, s) for p, experts in stats.items() for e, st in experts.items() for s in st.grad} == set(direct)
    for (prefix, expert, suffix), (g, g2, w) in direct.items():
        st = stats[prefix][expert]
        torch.testing.assert_close(st.grad[suffix], g, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(st.grad_sq[suffix], g2, rtol=1e-5, atol=1e-12)
        assert torch.equal(st.weight[suffix], w.detach())
    assert_scores_match_direct(ExpertScores.from_stats(stats, {}, {}), direct)


def assert_scores_match_direct(scores: ExpertScores, direct):
    assert sorted(scores.layers) == sorted({prefix for prefix, _, _ in direct})
    for prefix, rules in scores.layers.items():
        assert sorted(rules) == sorted(GRADIENT_RULES)
        for rule, got in rules.items():
            expected = [direct_score(rule, [v for k, v in direct.items() if k[:2] == (prefix, e)])
                        for e in range(len(got))]
            assert got == pytest.approx(expected, rel=1e-4), (rule, prefix)


def test_stats_match_plain_autograd_on_a_fresh_model():
    torch.manual_seed(0)
    model = Transformer(SMALL, seed=1).eval()
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, 97, (3, 4, 13)).unbind(0)]
    stats = expert_gradient_stats(model, [[batch] for batch in batches])
    assert sorted(stats) == ["layers.1.ffn.moe", "layers.3.ffn.moe"] and all(sorted(v) == [0, 1, 2, 3] for v in stats.values())
    # the model is left as found: every parameter still requires grad, eval mode kept
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert_match_direct(stats, direct_stats(model, batches))
    again = expert_gradient_stats(model, [[batch] for batch in batches])
    for prefix in stats:
        for a, b in zip(stats[prefix].values(), again[prefix].values()):
            assert all(torch.equal(a.grad_sq[k], b.grad_sq[k]) and torch.equal(a.grad[k], b.grad[k]) for k in a.grad)


@pytest.mark.parametrize("kwargs, message", [
    ({"select": "uniform", "calibration_data": "source"}, "--select uniform uses no gradients"),
    ({"select": "weight_norm", "calibration_data": "source"}, "--select weight_norm uses no gradients"),
    ({"calibration_data": " "}, "--calibration-data is empty"),
    ({"calibration_data": "source", "calibration_batches": 0}, "--calibration-batches must be >= 1"),
    ({"calibration_data": "source", "calibration_batch_size": 0}, "--calibration-batch-size must be >= 1"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        ExpandConfig(source="a", destination="b", multiplier=2, **kwargs)


# ---- a trained source checkpoint ----

@pytest.fixture(scope="module")
def source(tmp_path_factory, trained_source):
    """conftest's trained source, a folder for this module's outputs, and a small text to calibrate on."""
    root = tmp_path_factory.mktemp("calibration")
    text = root / "calib.jsonl"
    text.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox {i * 7} jumps over "
                                                f"the lazy dog {i * 3} times.\n" * 3}) + "\n"
                            for i in range(40)))
    return {**trained_source, "root": root, "text": text}


@pytest.mark.slow
def test_source_calibration_matches_autograd_on_cpt_windows(source):
    cal = calibrate(read_checkpoint(source["src"]), RunData(source["src"], source["cache"]), "source", 3, 4)
    assert cal.info == {"from": "calibration data", "data": "source", "batches": 3, "batch_size": 4,
                        "sequences": 12, "seq_len": 32, "description": cal.info["description"]}
    # Independently: the first 12 windows of seq_len + 1 tokens of the cpt split, in order.
    info = json.loads((source["tag"] / "ds_upcycle.json").read_text())["data"]
    prepared = prepare_data(DataConfig(source=info["source"], seq_len=info["seq_len"], vocab_size=info["vocab_size"],
                                       val_fraction=info["val_fraction"], cpt_fraction=info["cpt_fraction"],
                                       cache_dir=source["cache"]), source["tag"] / "tokenizer.model")
    cpt = np.fromfile(prepared.path / "cpt.bin", dtype=prepared.meta["dtype"]).astype(np.int64)
    rows = torch.from_numpy(np.stack([cpt[i * 32:i * 32 + 33] for i in range(12)]))
    batches = [(rows[i:i + 4, :-1], rows[i:i + 4, 1:]) for i in range(0, 12, 4)]
    # fp32 checkpoint: its module weights are the fp32 masters
    model = load_model(source["src"]).model
    assert_scores_match_direct(cal, direct_stats(model, batches))
    assert cal.checkpoint == {"tag": source["tag"].name, "global_step": 12}


@pytest.mark.slow
def test_deterministic_scores_and_allocation(source):
    def dry(rule):
        cfg = ExpandConfig(source=str(source["src"]), destination=str(source["root"] / "never"), multiplier=2,
                           select=rule, calibration_data="source", calibration_batches=2,
                           calibration_batch_size=4, data_cache=source["cache"])
        return expand_checkpoint(cfg, dry_run=True, progress=False).manifest

    first, second = dry("grad_sq"), dry("grad_sq")
    assert first["layers"] == second["layers"]  # scores bit-identical (exact float equality), same plans
    assert first["scores"]["from"] == "calibration data" and first["scores"]["batches"] == 2
    assert not (source["root"] / "never").exists()
    adam = expand_checkpoint(ExpandConfig(source=str(source["src"]), destination=str(source["root"] / "never"),
                                          multiplier=2), dry_run=True, progress=False).manifest
    assert adam["scores"] == {"from": "adam state"}
    assert [layer["scores"] for layer in adam["layers"]] != [layer["scores"] for layer in first["layers"]]


@pytest.mark.slow
def test_cli_expands_with_calibration_scores(source):
    dst = source["root"] / "e8"
    proc = expand_cli(str(source["src"]), str(dst), "-m", "2", "--select", "grad_sq", "--calibration-data",
                      str(source["text"]), "--calibration-batches", "2", "--calibration-batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "scores from gradients on 2 batches (8 sequences of 32 tokens)" in proc.stdout
    manifest = json.loads((dst / source["tag"].name / "upcycle_manifest.json").read_text())
    assert manifest["scores"]["from"] == "calibration data" and manifest["scores"]["data"] == str(source["text"])
    assert manifest["options"]["calibration_data"] == str(source["text"])
    # The recorded scores are those of the library on the same data, and the allocation follows them.
    cal = calibrate(read_checkpoint(source["src"]), RunData(source["src"]), str(source["text"]), 2, 4)
    for layer in manifest["layers"]:
        assert layer["scores"] == cal.layers[layer["prefix"]]["grad_sq"]
        assert layer["counts"] == allocate_copies(4, 8, layer["scores"], rule=manifest["options"]["allocate"])
        assert layer["counts"][int(np.argmax(layer["scores"]))] == max(layer["counts"])
    # The data: the documents in order, each followed by EOS, tokenized with the checkpoint's tokenizer.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(source["tag"] / "tokenizer.model"))
    docs = [json.loads(line)["text"] for line in source["text"].read_text().splitlines()]
    tokens = np.concatenate([np.asarray(sp.encode(d) + [2]) for d in docs])
    windows = calibration_data(RunData(source["src"]), str(source["text"]), 8).windows
    assert np.array_equal(windows, np.stack([tokens[i * 32:i * 32 + 33] for i in range(8)]))
    assert tree_digest(source["src"]) == source["digest"]


@pytest.mark.slow
def test_missing_calibration_data_one_line_and_nothing_written(source):
    dst = source["root"] / "not-written"
    proc = expand_cli(str(source["src"]), str(dst), "-m", "2", "--calibration-data",
                      str(source["root"] / "missing.txt"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ds-upcycle: error: --calibration-data: data file not found: {source['root'] / 'missing.txt'}"]
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}*"))
    assert tree_digest(source["src"]) == source["digest"]


@pytest.mark.slow
def test_checkpoint_without_run_file_refused_before_writing(source):
    plain = source["root"] / "plain" / source["tag"].name
    shutil.copytree(source["tag"], plain)
    (plain / "ds_upcycle.json").unlink()
    dst = source["root"] / "plain-out"
    cfg = ExpandConfig(source=str(plain), destination=str(dst), multiplier=2, calibration_data="source",
                       data_cache=source["cache"])
    with pytest.raises(UserError, match="--calibration-data: .* its training data settings are unknown") as err:
        expand_checkpoint(cfg, progress=False)
    assert "\n" not in str(err.value)
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}*"))


@pytest.mark.slow
def test_bf16_checkpoint_calibrates_at_the_fp32_master_weights(bf16_source, data_cache):
    """A bf16 run's module weights are its fp32 masters rounded; calibration uses the masters."""
    src = bf16_source["src"]
    reader = read_checkpoint(src)
    cal = calibrate(reader, RunData(src, str(data_cache)), "synthetic:docs=20,seed=5", 1, 2)
    def norm(params):  # as the weight_norm rule sums: by sorted name, in float64
        return float(sum(params[name].detach().double().square().sum() for name in sorted(params))) ** 0.5

    rounded = 0
    for layer in reader.moe_layers:
        for expert in range(layer.num_experts):
            states = reader.expert_state(layer.index, expert)
            masters = norm({suffix: state.fp32 for suffix, state in states.items()})
            assert cal.layers[layer.prefix]["weight_norm"][expert] == masters
            rounded += norm({suffix: state.fp32.bfloat16().float() for suffix, state in states.items()}) != masters
    assert rounded  # the masters are not all representable in bf16: the test can tell them apart


# ---- split directions (--split-copies) ----

def routed_inputs(model, batches):
    """{MoE prefix: [(router inputs [S, D], chosen experts [S, K])]}, captured by forward hooks."""
    captured, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith(GATE):
            def hook(router, args, out, prefix=name.removesuffix(GATE)):
                captured.setdefault(prefix, []).append((args[0].double().clone(), router.route(args[0])[0].clone()))
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    for hook in hooks:
        hook.remove()
    return {prefix: (torch.cat([x for x, _ in pairs]), torch.cat([e for _, e in pairs])) for prefix, pairs in captured.items()}


@pytest.mark.slow
def test_split_directions_match_a_direct_computation_and_split_each_experts_tokens(source, tmp_path):
    run = RunData(source["src"], source["cache"])
    batches = calibration_data(run, "source", 16).batches(4)
    model = load_model(source["src"]).model
    ours = router_input_directions(model, batches)
    for prefix, (x, experts) in routed_inputs(model, batches).items():
        for i in range(4):
            rows = x[(experts == i).any(dim=1)].numpy()
            mean, cov = rows.mean(0), np.cov(rows, rowvar=False, bias=True)
            d = np.linalg.eigh(cov)[1][:, -1]
            d = d - (d @ mean) / (mean @ mean) * mean
            d /= np.linalg.norm(d)
            got = ours[prefix].directions_ED[i].double().numpy()
            assert abs(float(d @ got)) == pytest.approx(1.0, abs=1e-4)  # the same line (sign is free)
            assert float(ours[prefix].spread_E[i]) == pytest.approx(float(np.sqrt(d @ cov @ d)), rel=1e-4)
            assert int(ours[prefix].tokens_E[i]) == len(rows)

    busy = [(prefix, i) for prefix in sorted(ours) for i in range(4) if ours[prefix].tokens_E[i] >= 100]
    assert len(busy) >= 4  # this briefly trained model routes most tokens to a few experts

    def copy_shares(split: bool) -> list[float]:
        dst = tmp_path / f"split-{split}"
        expand_checkpoint(ExpandConfig(source=str(source["src"]), destination=str(dst), multiplier=2,
                                       world_size=1, ep_size=1, select="uniform", distinct_copies=True,
                                       split_copies=split,
                                       calibration_batches=4, calibration_batch_size=4, data_cache=source["cache"]),
                          progress=False)
        routes = routed_inputs(load_model(dst).model, batches)
        shares = []
        for prefix, i in busy:  # uniform, 4 -> 8 on one rank (world 1, ep 1): expert i's copies are i and i + 4
            experts = routes[prefix][1]
            first, second = int((experts == i).sum()), int((experts == i + 4).sum())
            shares.append(second / (first + second))
        return shares

    # Without the split the copy a token takes does not depend on the token: one copy takes them all.
    assert all(share in (0.0, 1.0) for share in copy_shares(False))
    # With it, both copies of every busy expert take tokens, and the split lies near the middle of an
    # expert's tokens (d is orthogonal to their mean). How even each split is depends on how the
    # tokens spread along d: for conftest's source, 0.08 to 0.91, median 0.44.
    split = copy_shares(True)
    shown = str([round(s, 3) for s in split])
    assert all(0 < share < 1 for share in split), shown
    assert 0.3 < float(np.median(split)) < 0.7, shown
