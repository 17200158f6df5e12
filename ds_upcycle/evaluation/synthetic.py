"""A small knowledge benchmark over the facts of the built-in synthetic corpus.

The corpus (`ds_upcycle.data.synthetic`) lists, for the entities of a few domains, the value of
each relation. A model trained on it can only predict those values by memorising them, so the
benchmark asks about the most frequently mentioned entities, whose facts any trained model has
seen many times:

- synthetic_facts_mc: "from the D records: ENTITY: r1 v1, ..., R" -> which of 4 values follows
  (the true one and 3 other values of relation R), scored by log-likelihood;
- synthetic_facts_gen: "from the D records: ENTITY:" -> generate the whole record, scored by exact
  match and by the share of relations given the right value.

Rows are generated from the checkpoint's data source (same seed and world size), so they match
the facts the model was trained on; the same source always gives the same rows.
"""

from __future__ import annotations

import random

from ..data.synthetic import SyntheticSpec, build_world
from ..errors import UserError

TEST_ENTITIES = 10      # per domain, by popularity: the most mentioned entities
FEWSHOT_ENTITIES = 5    # the next ones, as few-shot examples
CHOICES = 4


def spec_from_source(source: str | None) -> SyntheticSpec:
    if not source or not (source == "synthetic" or source.startswith("synthetic:")):
        raise UserError(f"the synthetic tasks (eval's default) ask about the built-in synthetic corpus; this "
                        f"checkpoint was trained on {source or 'data ds-upcycle does not know (an import)'}: "
                        f"name lm-eval tasks with --tasks, e.g. --tasks paper11 (the paper's 11 benchmarks) or "
                        f"--tasks arc_easy,hellaswag")
    try:
        return SyntheticSpec.parse(source)
    except (ValueError, TypeError) as err:
        raise UserError(f"bad synthetic data spec {source!r}: {err}") from None


def _entities(spec: SyntheticSpec, split: str) -> range:
    test_end = min(TEST_ENTITIES, spec.entities)
    if split == "test":
        return range(test_end)
    return range(test_end, min(test_end + FEWSHOT_ENTITIES, spec.entities))


def multiple_choice_rows(spec: SyntheticSpec, split: str = "test") -> list[dict]:
    rows = []
    for d, domain in enumerate(build_world(spec)):
        for entity in _entities(spec, split):
            facts = domain.facts_of(entity)
            for r, (relation, answer) in enumerate(facts):
                known = "".join(f"{rel} {value}, " for rel, value in facts[:r])
                rng = random.Random(f"{spec.seed}/{d}/{entity}/{r}")
                choices = rng.sample([v for v in domain.values[r] if v != answer], CHOICES - 1) + [answer]
                rng.shuffle(choices)
                rows.append({"domain": domain.name, "entity": domain.entities[entity], "relation": relation,
                             "prompt": f"from the {domain.name} records: {domain.entities[entity]}: {known}{relation}",
                             "choices": choices, "answer": choices.index(answer)})
    return rows


def record_rows(spec: SyntheticSpec, split: str = "test") -> list[dict]:
    rows = []
    for domain in build_world(spec):
        for entity in _entities(spec, split):
            facts = domain.facts_of(entity)
            rows.append({"domain": domain.name, "entity": domain.entities[entity],
                         "prompt": f"from the {domain.name} records: {domain.entities[entity]}:",
                         "target": ", ".join(f"{rel} {value}" for rel, value in facts)})
    return rows


def _dataset(make_rows, synthetic_source: str | None):
    import datasets

    spec = spec_from_source(synthetic_source)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(make_rows(spec, split))
                                 for split in ("test", "train")})


def facts_mc_dataset(synthetic_source: str | None = None, **_metadata):
    """lm-eval `custom_dataset`: called with the task's metadata, which carries the source."""
    return _dataset(multiple_choice_rows, synthetic_source)


def facts_gen_dataset(synthetic_source: str | None = None, **_metadata):
    return _dataset(record_rows, synthetic_source)


def score_record(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` of the generation task: whole-record and per-fact accuracy."""
    prediction = results[0].strip().removesuffix(".").strip()
    said = [part.strip() for part in prediction.split(",")]
    facts = doc["target"].split(", ")
    right = sum(i < len(said) and said[i] == fact for i, fact in enumerate(facts))
    return {"exact_match": float(prediction == doc["target"]), "fact_acc": right / len(facts)}
