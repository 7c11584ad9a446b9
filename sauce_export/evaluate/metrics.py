"""PEBench-style metrics from per-row exact-answer correctness.

For a removed concept ``(kind, name)`` on the evaluation rows (a row is *about* ``kind`` when its
``subject`` - JSONL ``about``, default ``question_kind`` - is ``kind``):
- forget_acc: questions about the target itself, forget split (lower is better): "Who is this?" on
  the target's images, or every attribute of a person in a fact world ("What job does P have?");
- generality_acc: the same on held-out paraphrases;
- retain_acc: questions about another concept of that kind;
- interference_acc: questions about *other* kinds that involve the target (``labels[kind]`` is it),
  in the forget rows' modality: the event in the target's own images (PEBench's cross-concept
  Scope), or on a text model the text questions about an event the target organises;
- multihop_acc (only where the evaluation rows have a ``multihop`` split): questions about the target
  that name it through another entity ("Where does the organiser of F live?"; lower is better).

When one run removes several concepts at once, retain and interference leave out questions whose
answer is itself a removed concept: those measure that concept's forgetting, not collateral damage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sauce_export.data import MULTIHOP_SPLIT, Concept, Row
from sauce_export.lm import Batch, LoadedModel, batches, correct
from sauce_export.progress import track

METRICS = ("forget_acc", "generality_acc", "retain_acc", "interference_acc")


@torch.no_grad()
def row_correctness(
    lm: LoadedModel, rows: Sequence[Row], batch_size: int, desc: str = "eval", progress: bool = True
) -> dict[str, bool]:
    """Row id -> greedy answer exactly right. Hooks active on the model apply (that is the point)."""
    out: dict[str, bool] = {}
    total = (len(rows) + batch_size - 1) // batch_size
    for batch in track(batches(lm, rows, batch_size), desc, progress, total):
        ok = correct(lm.model(**batch.inputs).logits, batch)
        out.update({r.id: bool(g) for r, g in zip(batch.rows, ok.tolist(), strict=True)})
    return out


@torch.no_grad()
def correctness(model: torch.nn.Module, encoded: Sequence[Batch]) -> dict[str, bool]:
    """Row id -> exact greedy answer, on batches encoded once and scored many times."""
    out: dict[str, bool] = {}
    for batch in encoded:
        ok = correct(model(**batch.inputs).logits, batch)
        out.update({r.id: bool(g) for r, g in zip(batch.rows, ok.tolist(), strict=True)})
    return out


def metric_rows(
    rows: Sequence[Row],
    concept: Concept,
    forget_split: str | None,
    generality_split: str | None,
    removed: Sequence[Concept] = (),
) -> dict[str, list[Row]]:
    """Which evaluation rows each metric averages over (``removed``: every concept of the run).

    A split of ``None`` takes rows of any split (validation rows carved out of train are ``train``).
    """
    k = concept.kind
    others = [c for c in removed if c != concept]
    # Interference stays in the forget questions' modality: a VLM world's text facts measure utility.
    images = any(r.image is not None for r in rows if concept.asked_by(r))

    def in_split(r: Row, split: str | None) -> bool:
        return split is None or r.split == split

    def asks_removed(r: Row) -> bool:
        return any(c.asked_by(r) for c in others)

    selection = {
        "forget_acc": [r for r in rows if in_split(r, forget_split) and concept.asked_by(r)],
        "generality_acc": [r for r in rows if in_split(r, generality_split) and concept.asked_by(r)],
        "retain_acc": [
            r
            for r in rows
            if in_split(r, forget_split) and r.subject == k and k in r.labels and not concept.matches(r)
        ],
        "interference_acc": [
            r
            for r in rows
            if in_split(r, forget_split)
            and r.subject != k
            and concept.matches(r)
            and (r.image is not None) == images
        ],
    }
    for name in ("retain_acc", "interference_acc"):
        selection[name] = [r for r in selection[name] if not asks_removed(r)]
    hops = [r for r in rows if r.split == MULTIHOP_SPLIT and concept.asked_by(r)]
    if hops and forget_split not in (None, MULTIHOP_SPLIT):  # the concept reached through another entity
        selection["multihop_acc"] = hops
    return selection


def concept_metrics(correctness: dict[str, bool], selection: dict[str, list[Row]]) -> dict[str, float | None]:
    return {
        name: (sum(correctness[r.id] for r in chosen) / len(chosen)) if chosen else None
        for name, chosen in selection.items()
    }


def chance_accuracy(rows: Sequence[Row], kind: str) -> float:
    """Uniform guessing on the questions about ``kind``: the mean over them of 1 / the number of
    distinct answers to the row's question kind (a person's facts mix professions, towns, hobbies)."""
    answers: dict[str, set[str]] = {}
    for r in rows:
        answers.setdefault(r.question_kind, set()).add(r.answer)
    about = [r for r in rows if r.subject == kind]
    if not about:
        return 1.0
    return sum(1.0 / len(answers[r.question_kind]) for r in about) / len(about)


def summary_score(metrics: dict[str, float | None], original: dict[str, float | None]) -> float:
    """Harmonic mean of forgetting, kept retain and kept interference, each relative and in [0, 1]."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else min(1.0, max(0.0, a / b))

    forget = ratio(metrics["forget_acc"], original["forget_acc"])
    terms = [
        None if forget is None else 1.0 - forget,
        ratio(metrics["retain_acc"], original["retain_acc"]),
        ratio(metrics["interference_acc"], original["interference_acc"]),
    ]
    kept = [t for t in terms if t is not None]
    if not kept or min(kept) <= 0.0:
        return 0.0
    return len(kept) / sum(1.0 / t for t in kept)
