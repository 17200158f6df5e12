"""The run record (ds_upcycle.json): files written by earlier versions read, and write back unchanged."""

import json

import pytest

from ds_upcycle.checkpoint import RUN_FILE, RunRecord, find_checkpoint
from ds_upcycle.checkpoint.run_record import read_run_record
from ds_upcycle.config import resolve_model_config
from ds_upcycle.errors import UserError

MODEL = resolve_model_config("tiny", ["vocab_size=512"]).to_dict()
# As train.py and `import` wrote them before the record was typed (key for key).
TRAINED = {"model": MODEL, "global_step": 40, "tokens_seen": 5120, "split": "pretrain",
           "data": {"source": "synthetic:docs=1500,seed=0", "text_field": "text", "seq_len": 32, "vocab_size": 512,
                    "tokenizer": None, "val_fraction": 0.05, "cpt_fraction": 0.35, "split_seed": 0},
           "run": {"seed": 0, "global_batch": 8, "source": "synthetic:docs=1500,seed=0", "seq_len": 32,
                   "val_fraction": 0.05, "cpt_fraction": 0.35, "text_field": "text"},
           "ds_upcycle_version": "0.1.0"}
IMPORTED = {"model": MODEL, "global_step": 0, "tokens_seen": 0, "optimizer_state": False, "data": {"seq_len": 4096},
            "imported_from": {"model_type": "olmoe", "architecture": "OlmoeForCausalLM",
                              "max_position_embeddings": 4096, "directory": "release"},
            "ds_upcycle_version": "0.1.0"}


@pytest.mark.parametrize("old", [TRAINED, IMPORTED], ids=["trained", "imported"])
def test_records_of_earlier_versions_read_and_write_back_unchanged(old, tmp_path):
    path = tmp_path / RUN_FILE
    path.write_text(json.dumps(old))
    record = read_run_record(path)
    assert json.loads(json.dumps(record.to_dict())) == old
    assert record.model.to_dict() == MODEL


def test_what_callers_read():
    trained, imported = RunRecord.from_dict(TRAINED), RunRecord.from_dict(IMPORTED)
    assert (trained.seq_len, trained.data_source, trained.optimizer_state, trained.imported_from) == (
        32, "synthetic:docs=1500,seed=0", True, None)
    assert (imported.seq_len, imported.data_source, imported.optimizer_state) == (4096, None, False)
    assert imported.imported_from.architecture == "OlmoeForCausalLM"
    # Fields an older record did not write take their defaults.
    minimal = RunRecord.from_dict({"model": MODEL})
    assert (minimal.global_step, minimal.split, minimal.data, minimal.run, minimal.optimizer_state) == (
        0, None, None, {}, True)


def test_grown_experts_and_groups():
    record = RunRecord.from_dict(TRAINED)
    layers = len(record.model.moe_layer_ids)
    assert record.with_experts([8] * layers).model.num_experts == 8
    uneven = record.with_experts([8] + [4] * (layers - 1))
    assert list(uneven.model.layer_experts) == [8] + [4] * (layers - 1)
    assert uneven.with_experts([4] * layers).model.layer_experts is None
    groups = [[0, 1, 2, 3, 0, 1, 2, 3]] * layers
    grouped = record.with_experts([8] * layers, groups)
    assert json.loads(json.dumps(grouped.to_dict()))["model"]["route_groups"] == groups
    with pytest.raises(UserError, match="route_groups cover"):  # a grouped model's groups must cover its experts
        grouped.with_experts([16] * layers)


def test_a_broken_record_is_refused_in_one_line(tmp_path):
    path = tmp_path / RUN_FILE
    for text, message in (("{", "not valid JSON"), ('{"global_step": 3}', "records no model config"),
                          (json.dumps({**IMPORTED, "imported_from": {"model_type": "x"}}), "not a ds-upcycle run")):
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            read_run_record(path)


def test_a_checkpoint_without_a_record_says_so(tmp_path):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(UserError, match="has no ds_upcycle.json"):
        find_checkpoint(tmp_path).run_record
