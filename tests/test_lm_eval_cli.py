"""ds-upcycle checkpoints through lm-eval's own command line, and what a wheel install carries."""

import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points

import pytest

from conftest import ROOT
from ds_upcycle.evaluation.lm_model import UpcycleLM
from eval_helpers import Request, trained_checkpoint

ROWS = [{"question": "from the gikaki records: gole:", "choices": ["roka", "lolu", "the"], "answer": 0},
        {"question": "as for", "choices": ["a", "records", "gole"], "answer": 1},
        {"question": "records: a", "choices": ["b", "c", "roka"], "answer": 2}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    return trained_checkpoint(tmp_path_factory, data_cache)


def test_lm_eval_finds_the_model_by_entry_point():
    (entry,) = [e for e in entry_points(group="lm_eval.models") if e.name == "ds-upcycle"]
    assert entry.load() is UpcycleLM


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_checkpoint(checkpoint, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    # lm-eval's defaults (device cuda:0) on a machine without a GPU, as its users run it.
    proc = subprocess.run([sys.executable, "-m", "ds_upcycle.lm_eval", "--model", "ds-upcycle",
                           "--model_args", f"checkpoint={checkpoint}", "--tasks", "tiny_mc",
                           "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(results_file.read_text())["results"]["tiny_mc"]["acc,none"]
    lm = UpcycleLM(str(checkpoint))
    right = 0
    for row in ROWS:
        # lm-eval's multiple-choice prompt: the question, then " " + choice.
        scores = [s for s, _ in lm.loglikelihood([Request(row["question"], " " + c) for c in row["choices"]],
                                                 disable_tqdm=True)]
        right += scores.index(max(scores)) == row["answer"]
    assert acc == pytest.approx(right / len(ROWS))


@pytest.mark.slow
def test_wheel_carries_the_suites_and_task_folders(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("ds_upcycle-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("ds_upcycle/eval/suites/paper11.yaml", "ds_upcycle/eval/suites/synthetic.yaml",
                 "ds_upcycle/eval/tasks/synthetic_facts/synthetic_facts_mc.yaml",
                 "ds_upcycle/eval/tasks/synthetic_facts/synthetic.py", "ds_upcycle/lm_eval.py"):
        assert path in names, path
    entry_points_txt = next(n for n in names if n.endswith("entry_points.txt"))
    assert "[lm_eval.models]\nds-upcycle = ds_upcycle.evaluation.lm_model:UpcycleLM" in \
        zipfile.ZipFile(wheel).read(entry_points_txt).decode()
