"""Built-in synthetic corpus: seeded, multi-domain, knowledge-heavy, no network needed.

Each domain has its own pseudo-word alphabet, entities, relations and a fixed table of facts
(entity, relation) -> value. A document belongs to one domain and is a few records, each listing
every fact of one entity (relations in a fixed order); entity popularity is Zipfian. Almost all
that is predictable in a record is memorised facts, so validation loss keeps falling with model
capacity: more experts store more facts. The domain-specific vocabularies give the router something
to specialise on.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterator

CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class SyntheticSpec:
    docs: int = 24000
    seed: int = 0
    domains: int = 8
    entities: int = 400       # per domain
    relations: int = 6        # per domain
    values: int = 16          # possible values of each relation
    records: tuple[int, int] = (2, 6)
    zipf: float = 0.8         # entity popularity ~ 1 / rank ** zipf within a domain

    @classmethod
    def parse(cls, text: str) -> "SyntheticSpec":
        """'synthetic' or 'synthetic:docs=1000,seed=3' (also domains, entities, relations, values, zipf)."""
        _, _, options = text.partition(":")
        values = {}
        for item in filter(None, options.split(",")):
            key, _, val = item.partition("=")
            if key not in ("docs", "seed", "domains", "entities", "relations", "values", "zipf"):
                raise ValueError(f"unknown synthetic option {key!r}")
            values[key] = float(val) if key == "zipf" else int(val)
        return cls(**values)


class Domain:
    """One domain of the corpus: its alphabet, name, entities, relations, values and fact table."""

    def __init__(self, rng: random.Random, spec: SyntheticSpec, used: set[str]) -> None:
        self.syllables = [c + v for c in rng.sample(CONSONANTS, 6) for v in rng.sample(VOWELS, 3)]
        self.name = self._word(rng, 3, used)
        self.entities = [self._word(rng, rng.choice((2, 3)), used) for _ in range(spec.entities)]
        self.relations = [self._word(rng, 2, used) for _ in range(spec.relations)]
        self.values = [[self._word(rng, 2, used) for _ in range(spec.values)] for _ in self.relations]
        self.facts = {(e, r): rng.randrange(spec.values)
                      for e in range(spec.entities) for r in range(spec.relations)}
        # Zipf-like popularity: a few entities are mentioned often, most rarely. Cumulative weights
        # once, so that a draw is a bisection (random.choices accumulates the same sums itself).
        self.cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** spec.zipf for rank in range(spec.entities)))

    def _word(self, rng: random.Random, syllables: int, used: set[str]) -> str:
        """A new word; lengthens it when short words run out, so any size of world terminates."""
        for attempt in range(1000):
            word = "".join(rng.choice(self.syllables) for _ in range(syllables + attempt // 20))
            if word not in used:
                used.add(word)
                return word
        raise RuntimeError("could not make a new word")

    def facts_of(self, entity: int) -> list[tuple[str, str]]:
        """(relation, value) of every relation of an entity, in the domain's fixed order."""
        return [(rel, self.values[r][self.facts[entity, r]]) for r, rel in enumerate(self.relations)]

    def record(self, rng: random.Random) -> str:
        """All facts of one entity, relations in the domain's fixed order."""
        entity = rng.choices(range(len(self.entities)), cum_weights=self.cum_weights)[0]
        facts = ", ".join(f"{rel} {value}" for rel, value in self.facts_of(entity))
        if rng.random() < 0.5:
            return f"{self.entities[entity]}: {facts}."
        return f"as for {self.entities[entity]}, {facts}."


def build_world(spec: SyntheticSpec) -> list[Domain]:
    """The domains of a spec: the same spec always gives the same world."""
    world = random.Random(spec.seed)
    used: set[str] = set()
    return [Domain(world, spec, used) for _ in range(spec.domains)]


def generate_documents(spec: SyntheticSpec) -> Iterator[str]:
    """Yield spec.docs documents; the same spec always yields the same text."""
    domains = build_world(spec)
    rng = random.Random(spec.seed + 1)
    for _ in range(spec.docs):
        domain = rng.choice(domains)
        count = rng.randint(*spec.records)
        body = " ".join(domain.record(rng) for _ in range(count))
        yield f"from the {domain.name} records: {body}"
