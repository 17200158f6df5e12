"""An exported checkpoint under lm-eval's stock `hf` model scores and generates as `ds-upcycle eval` does."""

import json

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM

from ds_upcycle.evaluation.lm_model import UpcycleLM
from ds_upcycle.evaluation.run import EvalConfig, run_eval
from ds_upcycle.evaluation.suites import resolve_tasks
from ds_upcycle.evaluation.tasks import UpcycleTaskManager, load_tasks
from ds_upcycle.hf.export import export_checkpoint
from ds_upcycle.hf.importer import import_checkpoint
from eval_helpers import Request, offline_hub, trained_checkpoint  # noqa: F401  (fixture)
from test_eval_tasks import ARC_ROWS, write_jsonl
from test_hf import hf_model_dir, sp_model  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache):
    checkpoint = trained_checkpoint(tmp_path_factory, data_cache)
    out = tmp_path_factory.mktemp("hf-export") / "model"
    export_checkpoint(checkpoint, out)
    return checkpoint, out


def test_hf_backend_gives_the_same_loglikelihood_per_request(exported, tmp_path):
    checkpoint, hf_dir = exported
    folder = tmp_path / "data" / "allenai" / "ai2_arc" / "ARC-Easy"
    for split in ("train", "validation", "test"):
        write_jsonl(folder / f"{split}.jsonl", ARC_ROWS)
    run_eval(EvalConfig(str(checkpoint), ("arc_easy",), data_dir=str(tmp_path / "data"), offline=True,
                        log_samples=True, output=str(tmp_path / "ours.json")))
    ours = [json.loads(line) for line in (tmp_path / "ours_samples.jsonl").read_text().splitlines()]

    manager = UpcycleTaskManager((), tmp_path / "data", needed=["arc_easy"])
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=4),
                                      tasks=load_tasks(manager, resolve_tasks(["arc_easy"], None)),
                                      task_manager=manager, log_samples=True)
    theirs = {row["doc_id"]: row for row in results["samples"]["arc_easy"]}
    assert len(ours) == len(theirs) == len(ARC_ROWS)
    for row in ours:
        ours_ll = [resp[0][0] for resp in row["resps"]]
        theirs_ll = [resp[0][0] for resp in theirs[row["doc_id"]]["resps"]]
        assert ours_ll == pytest.approx(theirs_ll, abs=1e-4)
        assert [a[0] for a in row["arguments"]] == [a[0] for a in theirs[row["doc_id"]]["arguments"]]


def test_hf_backend_generates_the_same_greedy_text(exported):
    checkpoint, hf_dir = exported
    prompts = [("The records of gole", {"until": ["\n"], "max_gen_toks": 12}),
               ("from the gikaki records:", {"until": ["."], "max_gen_toks": 12}),
               ("Question: as for\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 8})]
    requests = [Request(context, {**kwargs, "do_sample": False}) for context, kwargs in prompts]
    ours = UpcycleLM(str(checkpoint), batch_size=2).generate_until(requests, disable_tqdm=True)
    # One row at a time: the hf model's left-padded batches would shift RoPE positions.
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1).generate_until(
        requests, disable_tqdm=True)
    # The same tokens; lm-eval's hf model decodes a continuation on its own, and a SentencePiece-style
    # decoder drops the leading space of a text's first token (" as" -> "as"), which ours keeps.
    assert [o if o == t else o.removeprefix(" ") for o, t in zip(ours, theirs)] == theirs
    assert any(text.strip() for text in ours)


def test_an_import_evaluates_as_the_release_does_under_the_hf_model(tmp_path, sp_model):
    """`ds-upcycle eval`'s model on an imported checkpoint (its own tokenizer.json) against lm-eval's
    hf model on the release directory it came from."""
    hf_dir, _ = hf_model_dir("qwen3_moe", tmp_path, sp_model)
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    requests = [Request("The records of gole", " roka lolu"), Request("as for", " the"), Request("", "gikaki records")]
    ours = UpcycleLM(str(tmp_path / "ckpt"), batch_size=2).loglikelihood(requests, disable_tqdm=True)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=2).loglikelihood(
        requests, disable_tqdm=True)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
