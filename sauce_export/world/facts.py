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

from sauce_export.data import MULTIHOP_SPLIT
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
SPORTS = ("tennis", "rugby", "hockey", "golf", "cricket", "sailing", "boxing", "skiing")
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
    "birthplace": (
        TOWNS,
        ("Where was {x} born?", "In which city was {x} born?", "What is the birthplace of {x}?"),
        ("Tell me the city where {x} was born.",),
    ),
    "sport": (
        SPORTS,
        ("Which sport does {x} play?", "What sport does {x} practise?", "What is the sport of {x}?"),
        ("Tell me the sport that {x} plays.",),
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
    "birthplace": "{x} was born in {a}.",
    "sport": "{x} plays {a}.",
    "venue": "The {x} is held in {a}.",
    "month": "The {x} is in {a}.",
}
FACT_SPLITS = {"train": 1, "validation": 2, "heldout_view": 3, "heldout_paraphrase": 4, MULTIHOP_SPLIT: 5}
ORGANISER = "the organiser of the {x}"
"""How a multi-hop question names a person: through the festival they organise."""


@dataclass(frozen=True)
class FactWorldConfig:
    """How big the fact world is and how many variants of each fact every split has."""

    seed: int = 1
    persons: int = 20
    events: int = 8
    attributes: tuple[str, ...] = ("city", "profession", "instrument", "colour")
    """Each person's attributes (keys of PERSON_FACTS)."""
    multihop: tuple[str, ...] = ()
    """Organiser attributes asked through the festival ("Where does the organiser of the F live?")."""
    train_contexts: int = 3
    """Copies of each trained question after a random unrelated statement (the model learns to skip it)."""
    validation_rows: int = 3
    """Validation questions per fact: a trained wording after a new statement."""
    eval_rows: int = 4
    """``heldout_view`` questions per fact, likewise (``heldout_paraphrase``: one per held-out wording)."""

    @classmethod
    def large(cls, seed: int = 1) -> FactWorldConfig:
        """The PEBench-scale world: 4x the persons and events, six attributes, multi-hop questions."""
        return cls(seed, 80, 32, tuple(PERSON_FACTS), ("city", "birthplace", "profession"))


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
            Entity(n, "person", {a: rng.choice(PERSON_FACTS[a][0]) for a in cfg.attributes}, {"person": n})
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
        """One split's rows; every statement is about another entity than the question's. Multi-hop
        questions are trained and validated like the others; their evaluation rows form their own
        split (``multihop``, after evaluation statements), so forget/retain stay direct questions."""
        cfg = self.config
        rng = random.Random(cfg.seed * 100 + FACT_SPLITS[split])
        direct = [
            (entity.name, entity, attribute, entity.facts[attribute], entity.labels, entity.kind)
            for entity in self.persons + self.events
            for attribute in entity.facts
        ]
        hops = [
            (
                ORGANISER.format(x=event.name),
                event,
                attribute,
                person.facts[attribute],
                event.labels,
                "person",
            )
            for event in self.events
            for person in [self._person(self.organiser(event))]
            for attribute in cfg.multihop
        ]
        questions = {"train": direct + hops, "validation": direct + hops, MULTIHOP_SPLIT: hops}
        statements = "heldout_view" if split == MULTIHOP_SPLIT else split
        for name, entity, attribute, answer, labels, about in questions.get(split, direct):
            _, trained, held = (PERSON_FACTS if about == "person" else EVENT_FACTS)[attribute]
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
                    (self._statement(entity, statements, rng), rng.choice(trained)) for _ in range(count)
                ]
            stem = name.replace(" ", "_")
            for index, (context, wording) in enumerate(variants):
                question = wording.format(x=name)
                yield {
                    "id": f"{split}_{stem}_{attribute}_{index}",
                    "prompt": f"{context} {question}" if context else question,
                    "answer": answer,
                    "labels": labels,
                    "question_kind": attribute,
                    "about": about,
                    "split": split,
                }

    def _person(self, name: str) -> Entity:
        return next(p for p in self.persons if p.name == name)

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
        splits = ("heldout_view", "heldout_paraphrase", MULTIHOP_SPLIT)
        write_jsonl(tmp / "eval.jsonl", [r for split in splits for r in world.rows(split)])
        (tmp / "world.json").write_text(json.dumps(world.to_dict(), indent=1))
    return {name: out / f"{name}.jsonl" for name in ("train", "validation", "eval")}
