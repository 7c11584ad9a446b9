"""The one data format every stage reads: JSONL rows of prompts, optional images and answers.

A row::

    {"id": "train_00001_person_0", "prompt": "Who is in the picture?",
     "image": "images/train_00001.png",          # optional, relative to the JSONL file
     "answer": "Zorvak",                          # the expected (greedy, exact) answer
     "labels": {"person": "Zorvak", "event": "concert"},   # concept kind -> concept name
     "question_kind": "person",                   # which label the question asks about
     "about": "person",                           # optional: the label kind whose entity the
                                                  # question is about (default: question_kind)
     "split": "train"}                            # train | heldout_view | heldout_paraphrase | ...

A concept is a ``(kind, name)`` pair: its positives are rows whose ``labels[kind] == name``, its
negatives the other rows. Concept sets, calibration data and evaluation sets are all such files.
A fact question ("What job does Lumrax have?") has ``question_kind`` "profession" but is *about*
the person: with ``"about": "person"`` removing ``person:Lumrax`` forgets every attribute of
Lumrax, while a question of another kind that merely involves Lumrax (an event Lumrax organises,
asked by the event's name) measures interference.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sauce_export.errors import InputError

REQUIRED = ("prompt", "answer")
MULTIHOP_SPLIT = "multihop"
"""Evaluation split of multi-hop questions: a concept reached through another entity ("Where does
the organiser of the F live?"), scored beside forget/retain, never in them (docs/large-world.md)."""


@dataclass(frozen=True)
class Row:
    id: str
    prompt: str
    answer: str
    image: Path | None = None
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    question_kind: str = ""
    split: str = ""
    about: str = ""
    """The label kind whose entity the question is about (JSONL ``about``); empty: question_kind."""

    @property
    def subject(self) -> str:
        """The label kind the question is about: ``about`` where set, else ``question_kind``."""
        return self.about or self.question_kind


@dataclass(frozen=True)
class Concept:
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    def matches(self, row: Row) -> bool:
        return row.labels.get(self.kind) == self.name

    def asked_by(self, row: Row) -> bool:
        """The row asks about this concept's entity itself (a forget question), not just involves it."""
        return row.subject == self.kind and self.matches(row)


def write_jsonl(path: Path, rows: Iterable[dict[str, object]]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def read_rows(path: Path | str) -> list[Row]:
    """Read and validate a JSONL file; every problem is an InputError naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "path", "data file does not exist")
    rows = []
    images_ok: set[Path] = set()
    with open(path, "rb") as fh:
        for line_no, raw_line in enumerate(fh, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(where, "encoding", f"not UTF-8 (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(where, "json", f"not valid JSON ({err.msg})") from err
            if not isinstance(raw, dict):
                raise InputError(where, "row", "each line must be a JSON object")
            for key in REQUIRED:
                if not isinstance(raw.get(key), str) or not raw[key]:
                    raise InputError(where, key, "missing or not a non-empty string")
            labels = raw.get("labels") or {}
            if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
                raise InputError(where, "labels", "must be an object of string labels")
            question_kind = str(raw.get("question_kind", ""))
            about = raw.get("about", question_kind)
            if not isinstance(about, str) or (about != question_kind and about not in labels):
                raise InputError(where, "about", "must be question_kind or a key of labels")
            image = raw.get("image")
            image_path = None
            if image is not None:
                image_path = (path.parent / str(image)).resolve()
                if image_path not in images_ok:
                    _check_image(image_path, where)
                    images_ok.add(image_path)
            rows.append(
                Row(
                    id=str(raw.get("id", f"{path.name}:{line_no}")),
                    prompt=raw["prompt"],
                    answer=raw["answer"],
                    image=image_path,
                    labels=labels,
                    question_kind=question_kind,
                    split=str(raw.get("split", "")),
                    about=about,
                )
            )
    if not rows:
        raise InputError(str(path), "rows", "data file is empty")
    return rows


def _check_image(path: Path, where: str) -> None:
    """The file exists and its header is one PIL reads (the pixels are decoded later, per batch)."""
    if not path.is_file():
        raise InputError(where, "image", f"image file {path} does not exist")
    try:
        Image.open(path).close()  # parses the header only
    except (OSError, Image.DecompressionBombError) as err:
        raise InputError(
            where, "image", f"{path} is not an image PIL can read ({type(err).__name__})"
        ) from None


def concept_split(rows: list[Row], concept: Concept, where: str) -> tuple[list[Row], list[Row]]:
    """(positives, negatives) of a concept; an empty side is an InputError naming the concept."""
    pos = [r for r in rows if concept.matches(r)]
    neg = [r for r in rows if not concept.matches(r)]
    if not pos:
        raise InputError(
            where, "concepts", f"no rows labelled {concept.kind}={concept.name!r} (empty concept set)"
        )
    if not neg:
        raise InputError(where, "concepts", f"every row is labelled {concept}: no negatives to contrast with")
    return pos, neg


def hold_out(rows: list[Row], share: float) -> tuple[list[Row], list[Row]]:
    """(kept, held back): a deterministic validation carve-out of training rows.

    Whole groups are held back (an image with all its questions; a text row alone), so no held-back
    image is ever seen by the SAE or the fold. Each answer of each question kind gets its share (at
    least one group where it has two or more), so every concept has validation rows. Groups are
    ranked by a hash of the image file name or row id, not by file order or a random draw.
    """

    def group(row: Row) -> str:
        return row.image.name if row.image is not None else row.id

    def rank(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()

    strata: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        strata[(row.question_kind, row.answer)].add(group(row))
    held: set[str] = set()
    for key in sorted(strata):
        groups = sorted(strata[key], key=rank)
        quota = max(1, round(share * len(groups))) if len(groups) > 1 else 0
        for name in groups:
            if len(held & strata[key]) >= quota:
                break
            held.add(name)
    return [r for r in rows if group(r) not in held], [r for r in rows if group(r) in held]
