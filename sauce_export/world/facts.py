"""Text fact worlds: the shipped text model's person facts as train / validation / eval files.

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
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sauce_export.world.generate import FACT_QUESTIONS, World, WorldConfig


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
