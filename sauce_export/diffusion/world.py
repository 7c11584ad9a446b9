"""The diffusion world: 16x16 renders of a few objects in a few styles, with captions.

UnlearnCanvas in miniature, deterministic from one seed. An *object* is a shape, a *style* a solid
palette (background and foreground colour), both very distinct so a tiny classifier recognises
every render and a tiny UNet learns them in minutes on a CPU. A row is a prompt plus the seed of
the initial noise; splits differ by noise seeds, so no choice is made on evaluation rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 16
OBJECTS = ("square", "circle", "triangle", "cross")
# style -> (background, foreground), RGB in [0, 1]
STYLES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "ember": ((0.05, 0.05, 0.1), (0.95, 0.2, 0.1)),
    "frost": ((0.9, 0.95, 1.0), (0.1, 0.3, 0.9)),
    "meadow": ((0.95, 0.85, 0.2), (0.1, 0.55, 0.15)),
}
TEMPLATES = (
    "a {object} in {style} style",
    "{style} style painting of a {object}",
    "a {object}, {style} style",
    "an image of a {object} in the {style} style",
)
SPLIT_SEEDS = {"train": 0, "validation": 1_000_000, "eval": 2_000_000}


@dataclass(frozen=True)
class DiffusionRow:
    """One generation: a prompt, its labels and the seed of its initial noise."""

    prompt: str
    object: str
    style: str
    seed: int

    def label(self, kind: str) -> str:
        return self.object if kind == "object" else self.style


def caption(obj: str, style: str, template: int = 0) -> str:
    return TEMPLATES[template].format(object=obj, style=style)


def _mask(obj: str, rng: random.Random) -> np.ndarray:
    """Boolean mask of the shape, with a jitter of one pixel in size and position."""
    n = IMAGE_SIZE
    half = 5 + rng.randint(-1, 1)
    cy, cx = n / 2 - 0.5 + rng.randint(-1, 1), n / 2 - 0.5 + rng.randint(-1, 1)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    dy, dx = y - cy, x - cx
    if obj == "square":
        return (np.abs(dy) <= half - 0.5) & (np.abs(dx) <= half - 0.5)
    if obj == "circle":
        return dy**2 + dx**2 <= half**2
    if obj == "triangle":
        top = cy - half
        return (dy <= half) & (y >= top) & (np.abs(dx) <= (y - top) * 0.55)
    if obj == "cross":
        arm = max(1.0, half / 2.5)
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= half)
        return inside & ((np.abs(dy) <= arm) | (np.abs(dx) <= arm))
    raise ValueError(f"unknown object {obj!r}")


def render(obj: str, style: str, seed: int) -> np.ndarray:
    """A float32 (3, H, W) image in [-1, 1] (the diffusion model's pixel range)."""
    rng = random.Random(f"{obj}/{style}/{seed}")
    bg, fg = (np.asarray(c, dtype=np.float32) for c in STYLES[style])
    mask = _mask(obj, rng)[None]
    img = np.where(mask, fg[:, None, None], bg[:, None, None])
    return (img * 2.0 - 1.0).astype(np.float32)


def rows(split: str, per_prompt: int, seed: int = 0) -> list[DiffusionRow]:
    """Every (object, style, template) prompt with ``per_prompt`` noise seeds of ``split``."""
    base = SPLIT_SEEDS[split] + seed * 10_000_000
    out = []
    i = 0
    for obj in OBJECTS:
        for style in STYLES:
            for t in range(len(TEMPLATES)):
                for _ in range(per_prompt):
                    out.append(DiffusionRow(caption(obj, style, t), obj, style, base + i))
                    i += 1
    return out


def build_world(out: Path, seed: int = 0, per_prompt: dict[str, int] | None = None) -> dict[str, Path]:
    """Write train/validation/eval JSONL rows (prompt, object, style, noise seed)."""
    per_prompt = per_prompt or {"train": 8, "validation": 3, "eval": 4}
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in per_prompt.items():
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows(split, n, seed)))
        files[split] = path
    return files


def read_rows(path: Path) -> list[DiffusionRow]:
    from sauce_export.errors import InputError

    if not path.is_file():
        raise InputError(str(path), "path", "file does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            out.append(
                DiffusionRow(str(raw["prompt"]), str(raw["object"]), str(raw["style"]), int(raw["seed"]))
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(str(path), f"line {i + 1}", f"not a diffusion row ({err})") from None
    return out
