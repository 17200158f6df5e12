"""lm-eval tasks for ds-upcycle: our task folder, local copies of hub datasets, clear failures.

Every task built here loads its dataset through `DatasetLoader`, in this order:
1. local files under `--data-dir`: `DIR/<dataset_path>/<dataset_name>/` (or `DIR/<dataset_path>/`
   and its `data/` folder for a dataset without a name) holding files in the hub's schema named by
   split: `test.jsonl`, `validation.parquet`, `train-00000-of-00001.parquet`, ...;
2. `DIR/<dataset_path>/` as a snapshot of the dataset's hub repository (it has a README.md or a
   loading script), which `datasets` loads itself;
3. the hub (or its local cache, e.g. with HF_DATASETS_OFFLINE=1).
When none has it, the task fails with one line naming the dataset and where it was looked for.

A copy need not hold every split the task's YAML names: the split a task scores must be there
(else one line names the task, the split and the files), the others (train, few-shot source) are
stood in for by empty splits, and a task that then needs few-shot examples from one of them fails
in one line when its shot count is known (`check_fewshot_source`). A suite may score another
split than the task's own (`split:`), e.g. validation rows where a local copy has no test rows,
and draw few-shot examples from another (`fewshot_split:`). `DIR/nltk_data/`, when present, is
NLTK's data folder (IFEval's sentence splitter needs `tokenizers/punkt_tab`).

lm-eval's TaskManager builds each task from its YAML through a TaskFactory; the hook is the
factory's final config of each task (lm-eval 0.4.13's `_load_full_config`), where the dataset
loading becomes a `custom_dataset`, lm-eval's own way for a task to supply its data.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path

from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.tasks._index import TaskIndex

from ..errors import UserError, did_you_mean
from .suites import TaskSpec, eval_dir

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
NLTK_FOLDER = "nltk_data"   # under --data-dir: NLTK's data (IFEval needs tokenizers/punkt_tab)


class _NoCustomDatasetHint(logging.Filter):
    """lm-eval tells every task with a custom_dataset how to pass it kwargs; ours need none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoCustomDatasetHint())


def go_offline() -> None:
    """Never touch the network for datasets or models: local files and caches only."""
    import datasets
    import huggingface_hub.constants

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def use_nltk_data(folder: Path) -> None:
    """Let NLTK (IFEval's sentence splitter) find its data in `folder` instead of downloading it."""
    os.environ["NLTK_DATA"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("NLTK_DATA")]))
    import nltk

    if str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))


def local_data_files(data_dir: Path, path: str, name: str | None) -> tuple[str, dict[str, list[str]]] | None:
    """(builder, {split: files}) of a dataset stored under data_dir, or None."""
    root = data_dir / path
    folders = [root / name] if name else [root, root / "data"]
    for folder in folders:
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in FILE_BUILDERS)
        if not files:
            continue
        builders = {FILE_BUILDERS[p.suffix] for p in files}
        if len(builders) > 1:
            raise UserError(f"{folder} mixes file formats ({', '.join(sorted(builders))}); keep one kind")
        splits = defaultdict(list)
        for file in files:
            # "test.jsonl", "test-00000-of-00001.parquet" -> test
            splits[re.split(r"[-.]", file.name, maxsplit=1)[0]].append(str(file))
        return builders.pop(), dict(splits)
    return None


def split_names(cfg: dict) -> tuple[str | None, list[str]]:
    """(the split a task config scores, the other splits it reads) as lm-eval picks them."""
    scored = cfg.get("test_split") or cfg.get("validation_split")
    fewshot = (cfg.get("fewshot_config") or {}).get("split")
    others = [cfg.get(key) for key in ("training_split", "validation_split", "fewshot_split")] + [fewshot]
    return scored, [split for split in dict.fromkeys(others) if split and split != scored]


class DatasetLoader:
    """The `custom_dataset` of one task: local copy first, then the hub.

    `scored` must exist in the copy; each of `others` that does not is an empty split with the
    same columns (recorded in `stand_ins`), so that a task builds without its training split.
    """

    def __init__(self, task: str, path: str, name: str | None, kwargs: dict | None, data_dir: Path | None,
                 scored: str | None = None, others: list[str] = ()) -> None:
        self.task, self.path, self.name = task, path, name
        self.kwargs = dict(kwargs or {})
        self.data_dir = data_dir
        self.scored, self.others = scored, list(others)
        self.stand_ins: set[str] = set()
        self.looked_in = "the hub cache"
        self.found: list[str] = []

    def __repr__(self) -> str:  # lm-eval writes task configs into the results file
        data_dir = str(self.data_dir) if self.data_dir else None
        return f"DatasetLoader({self.path!r}, {self.name!r}, data_dir={data_dir!r})"

    @property
    def label(self) -> str:
        return f"{self.path} ({self.name})" if self.name else self.path

    def __call__(self, **_metadata):
        import datasets

        if self.data_dir is not None:
            local = local_data_files(self.data_dir, self.path, self.name)
            if local is not None:
                builder, files = local
                self.looked_in = str(Path(next(iter(files.values()))[0]).parent)
                return self._complete(datasets.load_dataset(builder, data_files=files))
            snapshot = self.data_dir / self.path
            if (snapshot / "README.md").is_file() or (snapshot / f"{snapshot.name}.py").is_file():
                self.looked_in = str(snapshot)
                return self._complete(self._load(str(snapshot)))
        return self._complete(self._load(self.path))

    def _complete(self, dataset):
        """Check the scored split is there; stand in for the other splits with empty ones."""
        import datasets

        self.found = sorted(dataset)
        if self.scored and self.scored not in dataset:
            raise UserError(f"task {self.task}: dataset {self.label} has no {self.scored!r} split in "
                            f"{self.looked_in} (found: {', '.join(self.found) or 'none'}); add its file "
                            f"(e.g. {self.scored}.jsonl) or score another split (a suite's `split:`)")
        features = dataset[self.found[0]].features if self.found else None
        for split in self.others:
            if split not in dataset and features is not None:
                dataset[split] = datasets.Dataset.from_dict({key: [] for key in features}, features=features)
                self.stand_ins.add(split)
        return dataset

    def _load(self, source: str):
        import datasets

        try:
            return datasets.load_dataset(source, self.name, **self.kwargs)
        except Exception as err:  # the hub client and builders raise many types; all mean "not here"
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            hint = (f"put its files under {self.data_dir / self.path / (self.name or '')}" if self.data_dir
                    else "pass --data-dir with a local copy")
            raise UserError(f"task {self.task}: dataset {self.label} is not available ({reason}); {hint}") from None


class _LocalDataFactory(TaskFactory):
    def __init__(self, *, meta: dict | None, data_dir: Path | None) -> None:
        super().__init__(meta=meta)
        self.data_dir = data_dir
        self.split_overrides: dict[str, str] = {}   # set while building a suite entry that names splits

    def _load_full_config(self, entry, overrides=None) -> dict:
        cfg = super()._load_full_config(entry, overrides)
        # Only leaf tasks that read a dataset by name; tasks that make their own data keep it.
        if isinstance(cfg.get("task"), str) and cfg.get("dataset_path") and not callable(cfg.get("custom_dataset")):
            cfg.update(self.split_overrides)
            scored, others = split_names(cfg)
            cfg["custom_dataset"] = DatasetLoader(cfg["task"], cfg["dataset_path"], cfg.get("dataset_name"),
                                                  cfg.get("dataset_kwargs"), self.data_dir, scored, others)
        return cfg


class UpcycleTaskManager(TaskManager):
    """lm-eval's TaskManager plus ds-upcycle's task folder and local dataset copies.

    Given the task names a run needs, it skips indexing lm-eval's own task files (seconds of
    YAML parsing) when our folders define them all.
    """

    def __init__(self, include_paths: list[str | Path] = (), data_dir: str | Path | None = None,
                 metadata: dict | None = None, needed: list[str] | None = None) -> None:
        data_dir = Path(data_dir) if data_dir else None
        if data_dir is not None and not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is not a directory")
        if data_dir is not None and (data_dir / NLTK_FOLDER).is_dir():
            use_nltk_data(data_dir / NLTK_FOLDER)
        paths = [eval_dir() / "tasks", *(Path(p) for p in include_paths)]
        for path in paths:
            if not path.is_dir():
                raise UserError(f"task folder not found: {path}")
        own_only = bool(needed) and set(needed) <= set(TaskIndex.build(paths))
        super().__init__(include_path=[str(p) for p in paths], include_defaults=not own_only, metadata=metadata)
        self._factory = _LocalDataFactory(meta=metadata, data_dir=data_dir)

    def load_spec(self, spec: TaskSpec) -> dict:
        """`load([spec.task])`, its tasks scoring `spec.split` and drawing few-shot examples from
        `spec.fewshot_split` instead of their own splits where the spec names them."""
        named = {"test_split": spec.split, "fewshot_split": spec.fewshot_split}
        self._factory.split_overrides = {key: split for key, split in named.items() if split}
        try:
            return self.load([spec.task])
        finally:
            self._factory.split_overrides = {}


def load_tasks(manager: TaskManager, specs: list[TaskSpec]) -> list:
    """Build the top-level Task or Group of every spec, its few-shot count applied to its tasks."""
    built = []
    for spec in specs:
        if spec.task not in manager.all_tasks:
            raise UserError(f"unknown task {spec.task!r}{did_you_mean(spec.task, manager.all_tasks)}")
        loaded = manager.load_spec(spec)
        top = loaded.get("groups", {}).get(spec.task) or loaded["tasks"].get(spec.task)
        items = [top] if top is not None else list(loaded["tasks"].values())  # a tag: its tasks
        for task in loaded["tasks"].values():
            if spec.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
            check_fewshot_source(task)
        built.extend(items)
    return built


def fewshot_source(task) -> str | None:
    """The split lm-eval draws a task's few-shot examples from."""
    config = task.config
    fewshot = getattr(getattr(task, "fewshot_cfg", None), "split", None) or getattr(config, "fewshot_split", None)
    return fewshot or config.training_split or config.validation_split or config.test_split


def check_fewshot_source(task) -> None:
    """A task asked for few-shot examples from a split its local copy lacks fails in one line."""
    loader, shots = task.config.custom_dataset, task.config.num_fewshot or 0
    split = fewshot_source(task)
    if shots > 0 and isinstance(loader, DatasetLoader) and split in loader.stand_ins:
        raise UserError(f"task {task.config.task}: {shots}-shot prompts need the {split!r} split of "
                        f"{loader.label}, which {loader.looked_in} lacks (found: {', '.join(loader.found)}); "
                        f"add its file or run it 0-shot (--num-fewshot 0)")
