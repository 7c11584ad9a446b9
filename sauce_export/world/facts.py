"""Text fact worlds: the shipped text model's person facts, and a seeded world for fresh models.

A fact question ("What job does Lumrax have?") has a ``question_kind`` per attribute but is *about*
its person (``about: person``), so the concept ``person:Lumrax`` forgets every attribute of
Lumrax and keeps the other persons' (docs/data-format.md).

``models/world-llama`` was trained on two wordings of each fact and knows nothing else (it answers
the held-out wording 0-19% of the time, and a question after an unrelated statement only ~50%).
So the files split by wording: the first trained wording is ``train`` and ``validation`` (every
automatic choice is made on it), the second trained wording is the evaluation's ``heldout_view``
(never read before verify; the model answers it 100%), the held-out wording is
``heldout_paraphrase`` (generality). The split names are the recipe's defaults, so a recipe needs
only ``model``, ``data`` and ``concepts``.

``FactWorld`` is a TOFU-like world from a seed for a model trained here (``train_text_model``):
persons with four attributes, festivals organised by persons (their questions involve the
organiser: interference), and questions after an unrelated statement. Train, validation and
evaluation rows differ by that statement, as the VLM world's splits differ by render.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sauce_export.world.generate import (
    _SYLLABLES,
    COLOURS,
    FACT_QUESTIONS,
    PROFESSIONS,
    TOWNS,
    World,
    WorldConfig,
)


def shipped_fact_rows(seed: int = 0) -> Iterator[dict[str, object]]:
    """Every fact row of the world of ``seed`` in the splits above (the shipped model: seed 0)."""
    world = World.make(WorldConfig(seed=seed))
    for person in world.persons:
        for fact, templates in FACT_QUESTIONS.items():
            wordings = [
                ("train", templates["train"][0]),
                ("validation", templates["train"][0]),
                ("heldout_view", templates["train"][1]),
                *(("heldout_paraphrase", t) for t in templates["heldout"]),
            ]
            for index, (split, template) in enumerate(wordings):
                yield {
                    "id": f"{split}_{person.name}_{fact}_{index}",
                    "prompt": template.format(name=person.name),
                    "answer": person.facts[fact],
                    "labels": {"person": person.name},
                    "question_kind": fact,
                    "about": "person",
                    "split": split,
                }


def build_text_world(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``train``, ``validation`` and ``eval`` JSONL files of the fact world into ``out``."""
    from sauce_export.data import write_jsonl
    from sauce_export.fsutil import atomic_dir

    rows = list(shipped_fact_rows(seed))
    files = {
        "train": ("train",),
        "validation": ("validation",),
        "eval": ("heldout_view", "heldout_paraphrase"),
    }
    with atomic_dir(out, overwrite=True) as tmp:
        for name, splits in files.items():
            write_jsonl(tmp / f"{name}.jsonl", [r for r in rows if r["split"] in splits])
    return {name: out / f"{name}.jsonl" for name in files}


INSTRUMENTS = ("violin", "drums", "flute", "harp", "cello", "trumpet", "guitar", "organ")
MONTHS = ("March", "April", "May", "June", "July", "August", "September", "October")
PERSON_FACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # attribute: (answers, trained wordings, held-out wordings)
    "city": (
        TOWNS,
        ("Which city does {x} live in?", "Where does {x} live?", "In which city is the home of {x}?"),
        ("Tell me the city where {x} lives.",),
    ),
    "profession": (
        PROFESSIONS,
        ("What is the profession of {x}?", "What job does {x} have?", "What does {x} do for a living?"),
        ("Tell me the profession of {x}.",),
    ),
    "instrument": (
        INSTRUMENTS,
        (
            "Which instrument does {x} play?",
            "What instrument does {x} play?",
            "What is the instrument of {x}?",
        ),
        ("Tell me the instrument that {x} plays.",),
    ),
    "colour": (
        tuple(COLOURS),
        (
            "What is the favourite colour of {x}?",
            "Which colour does {x} like best?",
            "What colour does {x} love?",
        ),
        ("Tell me the favourite colour of {x}.",),
    ),
}
EVENT_FACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "venue": (
        TOWNS,
        ("Where is the {x} held?", "In which city does the {x} take place?", "Which city hosts the {x}?"),
        ("Tell me the city of the {x}.",),
    ),
    "month": (
        MONTHS,
        ("In which month is the {x}?", "When is the {x} held?", "Which month does the {x} take place in?"),
        ("Tell me the month of the {x}.",),
    ),
}
STATEMENTS = {
    "city": "{x} lives in {a}.",
    "profession": "{x} works as a {a}.",
    "instrument": "{x} plays the {a}.",
    "colour": "{x} likes {a}.",
    "venue": "The {x} is held in {a}.",
    "month": "The {x} is in {a}.",
}
FACT_SPLITS = {"train": 1, "validation": 2, "heldout_view": 3, "heldout_paraphrase": 4}


@dataclass(frozen=True)
class FactWorldConfig:
    """How big the fact world is and how many variants of each fact every split has."""

    seed: int = 1
    persons: int = 20
    events: int = 8
    train_contexts: int = 3
    """Copies of each trained question after a random unrelated statement (the model learns to skip it)."""
    validation_rows: int = 3
    """Validation questions per fact: a trained wording after a new statement."""
    eval_rows: int = 4
    """``heldout_view`` questions per fact, likewise (``heldout_paraphrase``: one per held-out wording)."""


@dataclass
class Entity:
    name: str
    kind: str
    facts: dict[str, str]
    labels: dict[str, str]


class FactWorld:
    """Persons with four attributes and festivals, each festival organised by a distinct person."""

    def __init__(self, config: FactWorldConfig | None = None) -> None:
        self.config = cfg = config or FactWorldConfig()
        rng = random.Random(cfg.seed)
        names: list[str] = []
        while len(names) < cfg.persons + cfg.events:
            name = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
            if name not in names:
                names.append(name)
        self.persons = [
            Entity(n, "person", {a: rng.choice(v[0]) for a, v in PERSON_FACTS.items()}, {"person": n})
            for n in names[: cfg.persons]
        ]
        organisers = rng.sample(self.persons, cfg.events)
        self.events = [
            Entity(
                f"{n} Festival",
                "event",
                {a: rng.choice(v[0]) for a, v in EVENT_FACTS.items()},
                {"event": f"{n} Festival", "person": o.name},
            )
            for n, o in zip(names[cfg.persons :], organisers, strict=True)
        ]
        statements = [(e, a) for e in self.persons + self.events for a in e.facts]
        rng.shuffle(statements)
        half, quarter = len(statements) // 2, len(statements) // 4
        self.statements = {
            "train": statements[:half],
            "validation": statements[half : half + quarter],
            "heldout_view": statements[half + quarter :],
        }

    def organiser(self, event: Entity) -> str:
        return event.labels["person"]

    def rows(self, split: str) -> Iterator[dict[str, object]]:
        """One split's rows; every statement is about another entity than the question's."""
        cfg = self.config
        rng = random.Random(cfg.seed * 100 + FACT_SPLITS[split])
        entities = self.persons + self.events
        for entity in entities:
            table = PERSON_FACTS if entity.kind == "person" else EVENT_FACTS
            for attribute, (_, trained, held) in table.items():
                variants: list[tuple[str, str]] = []
                if split == "train":
                    for wording in trained:
                        variants.append(("", wording))
                        variants += [
                            (self._statement(entity, split, rng), wording) for _ in range(cfg.train_contexts)
                        ]
                elif split == "heldout_paraphrase":
                    variants = [("", wording) for wording in held]
                else:
                    count = cfg.validation_rows if split == "validation" else cfg.eval_rows
                    variants = [
                        (self._statement(entity, split, rng), rng.choice(trained)) for _ in range(count)
                    ]
                for index, (context, wording) in enumerate(variants):
                    question = wording.format(x=entity.name)
                    yield {
                        "id": f"{split}_{entity.name.replace(' ', '_')}_{attribute}_{index}",
                        "prompt": f"{context} {question}" if context else question,
                        "answer": entity.facts[attribute],
                        "labels": entity.labels,
                        "question_kind": attribute,
                        "about": entity.kind,
                        "split": split,
                    }

    def _statement(self, entity: Entity, split: str, rng: random.Random) -> str:
        """A true statement about an entity the question does not involve (by their labels),
        from this split's share of statements: half train, a quarter each validation and eval, so a
        validation or evaluation prompt never occurs in training."""
        pool = [
            (other, attribute)
            for other, attribute in self.statements[split]
            if not set(other.labels.values()) & set(entity.labels.values())
        ]
        other, attribute = rng.choice(pool)
        return STATEMENTS[attribute].format(x=other.name, a=other.facts[attribute])

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config.__dict__,
            "persons": [{"name": p.name, **p.facts} for p in self.persons],
            "events": [{"name": e.name, "organiser": self.organiser(e), **e.facts} for e in self.events],
        }


def build_fact_world(out: Path, config: FactWorldConfig | None = None) -> dict[str, Path]:
    """Write the fact world's ``train``, ``validation`` and ``eval`` files and ``world.json``."""
    import json

    from sauce_export.data import write_jsonl
    from sauce_export.fsutil import atomic_dir

    world = FactWorld(config)
    with atomic_dir(out, overwrite=True) as tmp:
        write_jsonl(tmp / "train.jsonl", world.rows("train"))
        write_jsonl(tmp / "validation.jsonl", world.rows("validation"))
        write_jsonl(tmp / "eval.jsonl", [*world.rows("heldout_view"), *world.rows("heldout_paraphrase")])
        (tmp / "world.json").write_text(json.dumps(world.to_dict(), indent=1))
    return {name: out / f"{name}.jsonl" for name in ("train", "validation", "eval")}
