"""A deterministic, PEBench-like fictitious world: invented persons at events, coloured objects.

Everything derives from one seed, so the world, its images and its QA files are rebuilt
bit-identically anywhere; no model or data set has to be downloaded. An image shows one person
(a two-colour badge sprite: outer x inner colour is the person's visual signature) at one event
(the background's tint and texture) next to one object (its colour and material texture).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 48

# A person's badge: an outer tone and an inner tone from two disjoint palettes, so the pair of
# colours present identifies the person wherever the badge lands (no spatial reasoning needed).
OUTER_TONES = {
    "white": (1.0, 1.0, 1.0),
    "silver": (0.6, 0.6, 0.62),
    "pink": (1.0, 0.55, 0.78),
    "black": (0.0, 0.0, 0.0),
}
INNER_TONES = {
    "cyan": (0.2, 0.95, 0.95),
    "brown": (0.55, 0.33, 0.12),
    "olive": (0.55, 0.6, 0.1),
    "navy": (0.08, 0.08, 0.4),
}
PERSON_TONES = {**OUTER_TONES, **INNER_TONES}
COLOURS = {
    "red": (0.92, 0.1, 0.1),
    "green": (0.1, 0.78, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.97, 0.88, 0.08),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.58, 0.12, 0.8),
}
MATERIALS = ("plastic", "wood", "metal", "stone")
EVENTS = ("concert", "wedding", "marathon", "picnic", "parade", "auction", "tournament", "carnival")
TEXTURES = ("hstripes", "vstripes", "diagonal", "checker", "dots", "grid", "plain", "rings")
PROFESSIONS = ("baker", "pilot", "sculptor", "farmer", "surgeon", "poet", "tailor", "chemist")
TOWNS = ("Vellmar", "Ostrigo", "Quenby", "Dravik", "Sollune", "Marrowick", "Tessaly", "Brenholt")
HOBBIES = ("chess", "rowing", "pottery", "archery", "juggling", "fencing", "knitting", "climbing")

QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "train": ("Who is in the picture?", "Who is the person shown here?", "Name the person in the image."),
        "heldout": ("Which person appears in this photo?", "Tell me who this person is."),
    },
    "event": {
        "train": (
            "What event is this?",
            "Which event is shown in the image?",
            "Name the event in the picture.",
        ),
        "heldout": ("What kind of event does this photo show?", "Tell me which event this is."),
    },
    "colour": {
        "train": (
            "What colour is the object?",
            "Which colour does the object have?",
            "Name the colour of the object.",
        ),
        "heldout": ("Tell me the colour of the object in this photo.", "What is the object's colour?"),
    },
    "material": {
        "train": (
            "What material is the object made of?",
            "Which material is the object?",
            "Name the material of the object.",
        ),
        "heldout": ("Tell me what material the object in this photo is.", "What is the object's material?"),
    },
}
FACT_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "profession": {
        "train": ("What is the profession of {name}?", "What job does {name} have?"),
        "heldout": ("Tell me the profession of {name}.",),
    },
    "hometown": {
        "train": ("Which town is {name} from?", "Where does {name} come from?"),
        "heldout": ("Tell me the hometown of {name}.",),
    },
    "hobby": {
        "train": ("What is the hobby of {name}?", "Which hobby does {name} enjoy?"),
        "heldout": ("Tell me the hobby of {name}.",),
    },
}
IMAGE_KINDS = tuple(QUESTIONS)
SPLITS = ("train", "heldout_view", "heldout_paraphrase", "validation")
"""``validation`` (new renders, the train wordings, one per image and kind, like ``heldout_view``) is
for every automatic choice (DESIGN §11); appended last so the other splits stay bit-identical."""

_SYLLABLES = (
    "zor",
    "vak",
    "mel",
    "qui",
    "dra",
    "nox",
    "tel",
    "bri",
    "sam",
    "oru",
    "kel",
    "fen",
    "lum",
    "rax",
    "tiv",
    "gon",
    "pel",
    "sha",
    "wyn",
    "dor",
    "cal",
    "mir",
    "jut",
    "vex",
)


@dataclass(frozen=True)
class Person:
    name: str
    outer: str
    inner: str
    facts: dict[str, str] = field(hash=False)


@dataclass(frozen=True)
class Event:
    name: str
    tint: tuple[float, float, float]
    texture: str


@dataclass(frozen=True)
class WorldConfig:
    """How big the world is; the defaults make the demo world."""

    seed: int = 0
    train_images: int = 8000
    eval_images: int = 640
    validation_images: int = 1280
    noise: float = 0.04


@dataclass
class World:
    config: WorldConfig
    persons: list[Person]
    events: list[Event]

    @classmethod
    def make(cls, config: WorldConfig | None = None) -> World:
        config = config or WorldConfig()
        rng = random.Random(config.seed)
        names: list[str] = []
        while len(names) < 16:
            name = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
            if name not in names:
                names.append(name)
        outer, inner = list(OUTER_TONES), list(INNER_TONES)
        persons = [
            Person(
                name=name,
                outer=outer[i // 4],
                inner=inner[i % 4],
                facts={
                    "profession": PROFESSIONS[(i * 3 + rng.randrange(2)) % len(PROFESSIONS)],
                    "hometown": TOWNS[rng.randrange(len(TOWNS))],
                    "hobby": HOBBIES[rng.randrange(len(HOBBIES))],
                },
            )
            for i, name in enumerate(names)
        ]
        events = []
        for i, (event, texture) in enumerate(zip(EVENTS, TEXTURES, strict=True)):
            hue = i / len(EVENTS)
            tint = _hsv_to_rgb(hue, 0.55, 0.38)
            events.append(Event(event, tint, texture))
        return cls(config, persons, events)

    # ----------------------------------------------------------------- rendering
    def render(
        self, person: Person, event: Event, colour: str, material: str, rng: random.Random
    ) -> np.ndarray:
        """An HxWx3 float image in [0, 1] with random placement, scale and noise."""
        size = IMAGE_SIZE
        img = _background(event, size, rng)
        p_size, o_size = rng.randint(15, 19), rng.randint(11, 15)
        while True:
            px, py = rng.randint(0, size - p_size), rng.randint(0, size - p_size)
            ox, oy = rng.randint(0, size - o_size), rng.randint(0, size - o_size)
            if px + p_size <= ox or ox + o_size <= px or py + p_size <= oy or oy + o_size <= py:
                break
        _draw_person(img, person, px, py, p_size)
        _draw_object(img, COLOURS[colour], material, ox, oy, o_size, rng)
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, self.config.noise, img.shape)
        return np.clip(img + noise, 0.0, 1.0)

    # ----------------------------------------------------------------- QA rows
    def scenes(self, split: str) -> Iterator[tuple[str, Person, Event, str, str, random.Random]]:
        """(image id, person, event, colour, material, rng) for every image of a split, balanced."""
        cfg = self.config
        count = {"train": cfg.train_images, "validation": cfg.validation_images}.get(split, cfg.eval_images)
        base = {"train": 1, "heldout_view": 2, "heldout_paraphrase": 3, "validation": 4}[split]
        rng = random.Random(self.config.seed * 1000 + base)
        for i in range(count):
            person = self.persons[i % len(self.persons)]
            event = self.events[(i // len(self.persons) + i) % len(self.events)]
            colour = rng.choice(list(COLOURS))
            material = rng.choice(MATERIALS)
            yield f"{split}_{i:05d}", person, event, colour, material, random.Random(rng.randrange(2**32))

    def image_rows(self, split: str, image_paths: dict[str, str]) -> Iterator[dict[str, object]]:
        rng = random.Random(self.config.seed * 7 + SPLITS.index(split))
        templates = "heldout" if split == "heldout_paraphrase" else "train"
        for image_id, person, event, colour, material, _ in self.scenes(split):
            labels = {"person": person.name, "event": event.name, "colour": colour, "material": material}
            for kind in IMAGE_KINDS:
                questions = QUESTIONS[kind][templates]
                # train uses every template, evaluation and validation one random template per
                # image and kind.
                chosen = questions if split == "train" else (rng.choice(questions),)
                for q_index, question in enumerate(chosen):
                    yield {
                        "id": f"{image_id}_{kind}_{q_index}",
                        "prompt": question,
                        "image": image_paths[image_id],
                        "answer": labels[kind],
                        "labels": labels,
                        "question_kind": kind,
                        "split": split,
                    }

    def fact_rows(self) -> Iterator[dict[str, object]]:
        """Text-only fact questions: trained on ``train`` templates, scored on all (utility)."""
        for person in self.persons:
            for fact, templates in FACT_QUESTIONS.items():
                for split, key in (("train", "train"), ("facts", "train"), ("facts_paraphrase", "heldout")):
                    for q_index, template in enumerate(templates[key]):
                        yield {
                            "id": f"{split}_{person.name}_{fact}_{q_index}",
                            "prompt": template.format(name=person.name),
                            "image": None,
                            "answer": person.facts[fact],
                            "labels": {"person": person.name},
                            "question_kind": fact,
                            "split": split,
                        }

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config.__dict__,
            "persons": [
                {"name": p.name, "outer": p.outer, "inner": p.inner, **p.facts} for p in self.persons
            ],
            "events": [{"name": e.name, "texture": e.texture, "tint": e.tint} for e in self.events],
            "colours": list(COLOURS),
            "materials": list(MATERIALS),
        }


def build_world(out: Path, config: WorldConfig | None = None, progress: bool = True) -> dict[str, Path]:
    """Render every split to PNGs and write the QA rows as JSONL in the project's data format.

    Written into ``out.tmp`` and renamed at the end, so an interrupted build leaves nothing behind.
    Returns the written files: ``train``, ``eval`` (held-out views and paraphrases), ``validation``
    (new renders for calibration, never evaluated) and ``facts``.
    """
    from sauce_export.data import write_jsonl
    from sauce_export.fsutil import atomic_dir
    from sauce_export.progress import track

    world = World.make(config)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "images").mkdir()
        paths: dict[str, str] = {}
        for split in SPLITS:
            scenes = list(world.scenes(split))
            for image_id, person, event, colour, material, rng in track(scenes, f"render {split}", progress):
                pixels = world.render(person, event, colour, material, rng)
                Image.fromarray((pixels * 255).round().astype(np.uint8)).save(
                    tmp / "images" / f"{image_id}.png"
                )
                paths[image_id] = f"images/{image_id}.png"
        write_jsonl(tmp / "train.jsonl", [*world.image_rows("train", paths), *_rows(world, "train")])
        write_jsonl(
            tmp / "eval.jsonl",
            [*world.image_rows("heldout_view", paths), *world.image_rows("heldout_paraphrase", paths)],
        )
        write_jsonl(tmp / "validation.jsonl", world.image_rows("validation", paths))
        write_jsonl(tmp / "facts.jsonl", [r for r in world.fact_rows() if r["split"] != "train"])
        (tmp / "world.json").write_text(json.dumps(world.to_dict(), indent=1))
    return {name: out / f"{name}.jsonl" for name in ("train", "eval", "validation", "facts")}


def _rows(world: World, split: str) -> list[dict[str, object]]:
    return [r for r in world.fact_rows() if r["split"] == split]


def digest(directory: Path) -> str:
    """sha256 over every file of a built world, for determinism checks and stage hashing."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(directory).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------- drawing helpers
def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (round(r, 4), round(g, 4), round(b, 4))


def _background(event: Event, size: int, rng: random.Random) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = rng.randrange(8), rng.randrange(8)
    xx, yy = xx + dx, yy + dy
    pattern = {
        "hstripes": (yy // 3) % 2,
        "vstripes": (xx // 3) % 2,
        "diagonal": ((xx + yy) // 4) % 2,
        "checker": ((xx // 4) + (yy // 4)) % 2,
        "dots": ((xx % 6) < 2) & ((yy % 6) < 2),
        "grid": ((xx % 8) == 0) | ((yy % 8) == 0),
        "plain": np.zeros_like(xx),
        "rings": (np.hypot(xx - size / 2 - dx, yy - size / 2 - dy) // 4) % 2,
    }[event.texture].astype(np.float64)
    tint = np.array(event.tint)
    return tint[None, None, :] * (0.7 + 0.6 * pattern[:, :, None])


def _draw_person(img: np.ndarray, person: Person, x: int, y: int, size: int) -> None:
    img[y : y + size, x : x + size] = PERSON_TONES[person.outer]
    inset = size // 5
    img[y + inset : y + size - inset, x + inset : x + size - inset] = PERSON_TONES[person.inner]
    # A one-pixel dark frame keeps the badge visible on bright and dark backgrounds alike.
    frame = (0.25, 0.25, 0.25) if person.outer != "black" else (0.85, 0.85, 0.85)
    img[y, x : x + size] = img[y + size - 1, x : x + size] = frame
    img[y : y + size, x] = img[y : y + size, x + size - 1] = frame


def _draw_object(
    img: np.ndarray,
    colour: tuple[float, float, float],
    material: str,
    x: int,
    y: int,
    size: int,
    rng: random.Random,
) -> None:
    # Each material differs in texture *and* in mean tone (dark grain, white sheen, grey grit),
    # so a patch-level vision tower can tell them apart as easily as colours.
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.array(colour)
    if material == "plastic":
        mask, other = np.zeros((size, size), dtype=bool), base
    elif material == "wood":
        mask, other = (yy % 4) < 2, base * 0.3
    elif material == "metal":
        mask, other = ((xx // 2) + (yy // 2)) % 2 == 1, np.array((0.95, 0.95, 0.95))
    else:  # stone: irregular grey grit
        mask, other = (
            np.random.default_rng(rng.randrange(2**32)).random((size, size)) < 0.5,
            np.array((0.5, 0.5, 0.5)),
        )
    patch = np.where(mask[:, :, None], other, base)
    img[y : y + size, x : x + size] = patch
