"""UnlearnCanvas-style scores of generated images, judged by the world's classifier.

For removed concepts of kind K (object or style): UA = share of the removed concepts' rows whose
image is *not* classified as their concept; IRA = K-accuracy on the rows that carry no removed
concept; CRA = accuracy of the other kind on those kept rows; scope = accuracy of the other kind on
the removed rows (reported, not gated: a removed object's style may go with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sauce_export.diffusion.model import Classifier, Sampling, sample
from sauce_export.diffusion.world import DiffusionRow
from sauce_export.progress import track

KINDS = ("object", "style")
DEFAULT_SAMPLING = Sampling()


@dataclass
class Judged:
    images: torch.Tensor
    objects: list[str]
    styles: list[str]

    def labels(self, kind: str) -> list[str]:
        return self.objects if kind == "object" else self.styles


def generate(
    pipe,  # type: ignore[no-untyped-def]
    rows: list[DiffusionRow],
    clf: Classifier,
    sampling: Sampling = DEFAULT_SAMPLING,
    batch_size: int = 64,
    desc: str = "generate",
    progress: bool = True,
    sampler: Callable[..., torch.Tensor] = sample,
) -> Judged:
    """Generate every row's image (its own noise seed) and classify it."""
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    images = torch.cat(
        [
            sampler(pipe, [r.prompt for r in chunk], [r.seed for r in chunk], sampling)
            for chunk in track(chunks, desc, progress)
        ]
    )
    objects, styles = clf.predict(images)
    return Judged(images, objects, styles)


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def accuracy(rows: list[DiffusionRow], judged: Judged) -> dict[str, float]:
    """Object and style accuracy over all rows (the original model's quality)."""
    return {k: _mean([r.label(k) == p for r, p in zip(rows, judged.labels(k), strict=True)]) for k in KINDS}


def removal_scores(
    rows: list[DiffusionRow], judged: Judged, removed: list[tuple[str, str]]
) -> dict[str, float]:
    """Scores of a (possibly multi-concept) removal: UA over every removed concept's rows; IRA and
    CRA over rows that carry none of the removed concepts."""
    gone = [i for i, r in enumerate(rows) if any(r.label(k) == n for k, n in removed)]
    kept = [i for i in range(len(rows)) if i not in set(gone)]
    kinds = {k for k, _ in removed}
    other = [k for k in KINDS if k not in kinds]

    def ok(i: int, k: str) -> bool:
        return judged.labels(k)[i] == rows[i].label(k)

    ua = [not ok(i, k) for i in gone for k, n in removed if rows[i].label(k) == n]
    ira = [ok(i, k) for i in kept for k in kinds]
    cra = [ok(i, k) for i in kept for k in other]
    scope = [ok(i, k) for i in gone for k in other]
    return {"ua": _mean(ua), "ira": _mean(ira), "cra": _mean(cra), "scope": _mean(scope)}


def fidelity(a: Judged, b: Judged) -> dict[str, float]:
    """Classifier agreement (object and style both equal) and pixel MSE / PSNR of b against a."""
    agree = sum(
        oa == ob and sa == sb for oa, ob, sa, sb in zip(a.objects, b.objects, a.styles, b.styles, strict=True)
    ) / len(a.objects)
    mse = float((a.images - b.images).pow(2).mean())
    psnr = float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse)))
    return {"agreement": agree, "mse": mse, "psnr": psnr}
