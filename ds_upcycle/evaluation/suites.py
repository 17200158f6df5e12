"""Named task lists (suites) with their few-shot settings, and what `--tasks` names.

A suite is a YAML file in `ds_upcycle/eval/suites/` (or any path): `name`, `description` and `tasks`, each
task with its `num_fewshot`, the `metric` ("metric,filter" as lm-eval reports it) that counts as
its score and, optionally, the `split` it scores and the `fewshot_split` its examples come from
instead of its own. `--tasks` takes a comma-separated mix of suite names, suite files and lm-eval task,
group or tag names.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError


def eval_dir() -> Path:
    """The package's `eval/` folder: task YAML and suites (override: $DS_UPCYCLE_EVAL_DIR)."""
    path = Path(os.environ.get("DS_UPCYCLE_EVAL_DIR", Path(__file__).resolve().parents[1] / "eval"))
    if not (path / "suites").is_dir():
        raise UserError(f"evaluation task folder not found at {path}; reinstall ds-upcycle or set "
                        f"DS_UPCYCLE_EVAL_DIR")
    return path


@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int | None = None     # None: the task's own default
    metric: str | None = None          # None: the first metric lm-eval reports
    split: str | None = None           # None: the split the task scores by its YAML
    fewshot_split: str | None = None   # None: the split its YAML draws few-shot examples from


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[TaskSpec, ...]


def available_suites() -> list[str]:
    return sorted(p.stem for p in (eval_dir() / "suites").glob("*.yaml"))


def load_suite(path: Path) -> Suite:
    try:
        data = yaml.safe_load(path.read_text())
        tasks = tuple(TaskSpec(str(t["task"]), None if t.get("num_fewshot") is None else int(t["num_fewshot"]),
                               t.get("metric"), t.get("split"), t.get("fewshot_split")) for t in data["tasks"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"bad suite file {path}: {type(err).__name__}: {err}") from None
    return Suite(str(data.get("name", path.stem)), str(data.get("description", "")), tasks)


def _suite_file(name: str) -> Path | None:
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    candidate = eval_dir() / "suites" / f"{name}.yaml"
    return candidate if candidate.is_file() else None


def resolve_tasks(names: list[str], num_fewshot: int | None = None) -> list[TaskSpec]:
    """Expand suites; `num_fewshot`, when given, replaces every task's shot count."""
    specs: list[TaskSpec] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        suite = _suite_file(name)
        specs.extend(load_suite(suite).tasks if suite else [TaskSpec(name)])
    if not specs:
        raise UserError("no tasks given; name tasks or a suite (" + ", ".join(available_suites()) + ")")
    seen = set()
    for spec in specs:
        if spec.task in seen:
            raise UserError(f"task {spec.task} is named twice")
        seen.add(spec.task)
    if num_fewshot is not None:
        specs = [dataclasses.replace(s, num_fewshot=num_fewshot) for s in specs]
    return specs
