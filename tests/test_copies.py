"""Copy diagnostics: the measures against values known by construction, and a real expanded run on
2 processes (ep_size 2) against the same measures recomputed in one process from the checkpoint
that run saved."""

import json
import math

import pytest
import torch

from conftest import SOURCE_MODEL, check_ok, expand_cli, run_train, tiny_run_args
from ds_upcycle.checkpoint import read_checkpoint, read_metrics
from ds_upcycle.trained import RunData, load_model, validation_loss
from ds_upcycle.trained.copies import (checkpoint_copy_diagnostics, co_selected, counting, expert_vectors,
                                      pair_distances)


def test_pair_distances_of_known_vectors():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    # copies 0,1 of source 0 equal; 2,3 of source 1, one twice the other: |w - 2w| / 1.5|w| = 2/3
    got = pair_distances(torch.stack([a, a, b, 2 * b]), [0, 0, 1, 1])
    assert got["sibling_distance"] == pytest.approx((0 + 2 / 3) / 2)
    # cross pairs: a-b and a-b twice (sqrt(2)), a-2b twice: |a - 2b| / ((3 + 6) / 2) = sqrt(45) / 4.5
    cross = [math.sqrt(2)] * 2 + [math.sqrt(45) / 4.5] * 2
    assert got["cross_distance"] == pytest.approx(sum(cross) / 4)
    assert pair_distances(torch.stack([a, b]), [0, 1])["sibling_distance"] is None  # never expanded


def test_co_selected_counts_tokens_holding_two_siblings():
    copy_of_E = torch.tensor([0, 1, 0, 1, 2])           # experts 0, 2 copy source 0; 1, 3 copy source 1
    experts_SK = torch.tensor([[0, 2], [0, 1], [3, 1], [4, 2], [2, 0]])
    assert co_selected(experts_SK, copy_of_E) == 3  # tokens 0, 2, 4
    top3 = torch.tensor([[0, 1, 4], [1, 4, 3]])         # the siblings need not be adjacent choices
    assert co_selected(top3, copy_of_E) == 1
    assert co_selected(torch.tensor([[0, 2, 1]]).t(), copy_of_E) == 0  # top-1: never


def test_expanded_run_records_copy_diagnostics(trained_source, tmp_path):
    src, cache = trained_source["src"], trained_source["cache"]
    expanded, cpt = tmp_path / "expanded", tmp_path / "cpt"
    check_ok(expand_cli(str(src), str(expanded), "-m", "2", "--router-noise", "0.05"))
    sources = [layer["sources"] for layer in json.loads(
        (expanded / (expanded / "latest").read_text().strip() / "upcycle_manifest.json").read_text())["layers"]]
    check_ok(run_train(tiny_run_args(trained_source["cfg"], 4, cache, *SOURCE_MODEL, "--eval-samples", "8", "--ep-size", "2",
                                     "--load", str(expanded), "--fresh-schedule", "--eval-interval", "2",
                                     "--save", str(cpt)), num_procs=2))

    loaded = load_model(cpt)
    assert [list(c) for c in loaded.record.copy_of] == sources  # kept through training
    evals = [r for r in read_metrics(cpt / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [14, 16]
    final = evals[-1]["copies"]
    assert [r["layer"] for r in final] == loaded.model.cfg.moe_layer_ids

    val = RunData(cpt).split("val")
    with counting(loaded.model, sources) as counter:
        validation_loss(loaded.model, val, 8, 4)
    shares = counter.shares()
    assert any(share > 0.1 for share in shares)  # right after a plain expansion, tokens take both copies
    for i, record in enumerate(final):
        direct = pair_distances(expert_vectors(loaded.model, i), sources[i])
        assert record["sibling_distance"] == pytest.approx(direct["sibling_distance"], rel=1e-5)
        assert record["cross_distance"] == pytest.approx(direct["cross_distance"], rel=1e-5)
        assert 0 < record["sibling_distance"] < record["cross_distance"]  # copies start equal
        # the same tokens, split over two ranks there: a near-tie may route one differently
        assert record["co_selected"] == pytest.approx(shares[i], abs=0.01)
    # the same from the checkpoint on disk, lineage from its record (scripts/copy_diagnostics.py)
    offline = checkpoint_copy_diagnostics(cpt, samples=8)
    assert [r["sibling_distance"] for r in offline] == pytest.approx([r["sibling_distance"] for r in final], rel=1e-5)
    assert [r["co_selected"] for r in offline] == pytest.approx(shares)


def _layer_sources(dst):
    tag_dir = dst / (dst / "latest").read_text().strip()
    return [layer["sources"] for layer in json.loads((tag_dir / "upcycle_manifest.json").read_text())["layers"]]


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_reinit_fraction_redraws_that_share_of_every_replicas_hidden_units(trained_source, tmp_path, fraction):
    src, dst = trained_source["src"], tmp_path / "reinit"
    check_ok(expand_cli(str(src), str(dst), "-m", "2", "--reinit-fraction", str(fraction)))
    source, out = read_checkpoint(src), read_checkpoint(dst)
    init_std = source.meta.run_record.model.init_std
    for layer, sources in enumerate(_layer_sources(dst)):
        seen = set()
        for expert, origin in enumerate(sources):
            old, new = source.expert_state(layer, origin), out.expert_state(layer, expert)
            if origin not in seen:  # the first copy is the source expert, weights and moments
                seen.add(origin)
                assert all(torch.equal(old[n].fp32, new[n].fp32) and torch.equal(old[n].exp_avg_sq, new[n].exp_avg_sq)
                           for n in old)
                continue
            hidden = old["w_gate.weight"].fp32.shape[0]
            changed = {n: (old[n].fp32 != new[n].fp32).all(dim=1 if n != "w_down.weight" else 0) for n in old}
            units = changed["w_gate.weight"]
            assert int(units.sum()) == round(fraction * hidden)  # whole rows / columns, the same units in all three
            assert torch.equal(changed["w_up.weight"], units) and torch.equal(changed["w_down.weight"], units)
            keep = ~units
            assert torch.equal(new["w_gate.weight"].fp32[keep], old["w_gate.weight"].fp32[keep])
            assert torch.equal(new["w_down.weight"].fp32[:, keep], old["w_down.weight"].fp32[:, keep])
            assert new["w_up.weight"].exp_avg[units].abs().sum() == 0
            assert new["w_down.weight"].exp_avg_sq[:, units].abs().sum() == 0
            assert new["w_up.weight"].fp32[units].std().item() == pytest.approx(init_std, rel=0.25)


def test_lift_groups_after_steps_is_recorded_and_honoured_by_a_resumed_run(trained_source, tmp_path):
    src, cache = trained_source["src"], trained_source["cache"]
    expanded, cpt = tmp_path / "expanded", tmp_path / "cpt"
    check_ok(expand_cli(str(src), str(expanded), "-m", "2", "--distinct-copies", "--lift-groups-after", "2",
                        "--world-size", "1", "--ep-size", "1"))
    assert load_model(expanded).record.lift_groups_at == 14  # the source's step 12 + 2
    args = tiny_run_args(trained_source["cfg"], 4, cache, *SOURCE_MODEL, "--eval-samples", "8", "--load",
                         str(expanded), "--fresh-schedule", "--eval-interval", "1", "--save", str(cpt))
    check_ok(run_train([*args, "--exit-at", "13"]))  # saved before the lift step ...
    assert load_model(cpt).model.cfg.route_groups is not None
    check_ok(run_train(args))  # ... and resumed without the expand flag: the record says when
    records = [r for r in read_metrics(cpt / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in records] == [13, 14, 15, 16]
    assert [bool(r.get("groups_lifted")) for r in records] == [False, True, False, False]
    co = [max(layer["co_selected"] for layer in r["copies"]) for r in records]
    assert co[0] == 0 and co[1] > 0  # groups forbid two copies of one expert; lifted, tokens take both again
    assert load_model(cpt).model.cfg.route_groups is None
