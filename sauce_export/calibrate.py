"""Per-concept calibration on validation rows: which score, how many latents, which clamp (DESIGN §11).

Every choice the recipe leaves open is made here, on validation rows only; the evaluation file is
first read by ``verify``. For one concept the hooked edit is scored at (score, top_n, clamp) points:
feature counts by doubling, clamps by bisection on the forget gate (forgetting grows as the clamp
goes more negative), and retain and interference only at the first clamp that forgets (they only
fall further beyond it). The objective is the smallest edit, ``latents x (1 + |clamp|)``, whose
forget_acc is ``forget_margin`` under the verify gate's limit and whose retain and interference keep
``hooked_keep + keep_margin`` of the original's; ties go to the higher ``compare`` summary score.
Then every concept is checked in the one union edit; a concept that fails there is searched again
with the others' edits in place. The margins keep a point that passes here from failing on another
CPU's floating point or on the evaluation rows' sampling.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sauce_export.data import Concept, Row
from sauce_export.edit import Edit
from sauce_export.errors import CalibrationFailed
from sauce_export.evaluate.metrics import (
    chance_accuracy,
    concept_metrics,
    correctness,
    metric_rows,
    summary_score,
)
from sauce_export.lm import Batch, LoadedModel, batches
from sauce_export.progress import track
from sauce_export.sae.model import SAE
from sauce_export.select import union_clamps, union_features

PARTS = ("forget_acc", "retain_acc", "interference_acc")


@dataclass(frozen=True)
class Point:
    """One concept's selection and clamp target: a point of the search (or the recipe's own)."""

    method: str
    top_n: int | None
    clamp: float
    features: tuple[int, ...]
    percentile: float | None = None

    @property
    def size(self) -> float:
        """Edit size: a latent clamped to 0 counts 1, pushed to ``c < 0`` counts ``1 + |c|``."""
        return len(self.features) * (1.0 + abs(self.clamp))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "top_n": self.top_n,
            "percentile": self.percentile,
            "clamp": self.clamp,
            "features": list(self.features),
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Point:
        return cls(d["method"], d["top_n"], float(d["clamp"]), tuple(d["features"]), d.get("percentile"))


@dataclass(frozen=True)
class Search:
    """The search space and the margins (``calibrate.*``) plus the verify gates they are under."""

    methods: Sequence[str]
    top_n: Sequence[int]
    clamps: Sequence[float]
    forget_margin: float
    keep_margin: float
    hooked_forget_margin: float
    hooked_keep: float
    sample_rows: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class EditSettings:
    """What every point's edit shares: the SAE, the site and the recipe's ``edit`` section."""

    sae: SAE
    site: str
    multiplier: float | None
    only_where_active: bool
    scope: str
    image_token_id: int | None

    def union(self, points: Mapping[str, Point]) -> Edit:
        """One edit for several concepts: their latents, each at its concept's target (the most
        negative where two concepts share a latent), as ``Run.edit`` builds it."""
        selected = {c: list(p.features) for c, p in points.items()}
        clamps = tuple(union_clamps(selected, {c: p.clamp for c, p in points.items()}))
        return Edit(
            sae=self.sae,
            features=tuple(union_features(selected.values())),
            site=self.site,
            clamp=clamps if len(set(clamps)) > 1 else clamps[0],
            multiplier=self.multiplier,
            only_where_active=self.only_where_active,
            scope=self.scope,  # type: ignore[arg-type]
            image_token_id=self.image_token_id,
        )


class Validation:
    """Each concept's validation rows, encoded once; the original model scored once; every hooked
    evaluation memoised by (edit, row set), so a point is never run twice."""

    def __init__(
        self,
        lm: LoadedModel,
        settings: EditSettings,
        rows: Sequence[Row],
        concepts: Sequence[Concept],
        search: Search,
        progress: bool = True,
    ) -> None:
        self.lm, self.settings, self.search, self.progress = lm, settings, search, progress
        self.chance = {str(c): chance_accuracy(rows, c.kind) for c in concepts}
        self.selections: dict[str, dict[str, list[Row]]] = {}
        self.encoded: dict[tuple[str, str], list[Batch]] = {}
        for c in concepts:
            chosen = metric_rows(rows, c, None, None, removed=concepts)
            rng = random.Random(search.seed)
            sel = {
                "forget_acc": chosen["forget_acc"],
                "retain_acc": _sample(chosen["retain_acc"], search.sample_rows, rng),
                "interference_acc": _sample(chosen["interference_acc"], search.sample_rows, rng),
            }
            self.selections[str(c)] = sel
            for part, part_rows in sel.items():
                self.encoded[(str(c), part)] = list(batches(lm, part_rows, search.batch_size))
        self.evaluations = self.rows_scored = 0
        self._memo: dict[tuple[Any, ...], dict[str, bool]] = {}
        self.original = {
            c: concept_metrics(self._correct(None, [(c, p) for p in PARTS]), self.selections[c])
            for c in self.selections
        }

    def has_rows(self, concept: str) -> bool:
        return bool(self.selections[concept]["forget_acc"])

    def limits(self, concept: str) -> dict[str, float | None]:
        """forget_acc at most ``forget_max``; retain/interference at least their minimum (None: no
        original accuracy to keep)."""
        s, orig = self.search, self.original[concept]
        keep = s.hooked_keep + s.keep_margin
        return {
            "forget_max": self.chance[concept] + s.hooked_forget_margin - s.forget_margin,
            "retain_min": None if orig["retain_acc"] is None else keep * orig["retain_acc"],
            "interference_min": None if orig["interference_acc"] is None else keep * orig["interference_acc"],
        }

    def _correct(
        self, points: Mapping[str, Point] | None, parts: Sequence[tuple[str, str]]
    ) -> dict[str, bool]:
        """Row id -> correct under the union edit of ``points`` (None: the original model)."""
        edit = None if points is None else self.settings.union(points)
        key = None if edit is None else (edit.features, edit.clamps)
        out: dict[str, bool] = {}
        model = self.lm.model
        for part in parts:
            memo = (key, *part)
            if memo not in self._memo:
                encoded = self.encoded[part]
                if edit is None:
                    self._memo[memo] = correctness(model, encoded)
                else:
                    with edit.apply(model):
                        self._memo[memo] = correctness(model, encoded)
                    self.evaluations += 1
                    self.rows_scored += sum(len(b.rows) for b in encoded)
            out.update(self._memo[memo])
        return out

    def forget(self, points: Mapping[str, Point], concept: str) -> tuple[float, bool]:
        """(forget_acc, complete) under the union edit of ``points``. Scoring stops at the batch
        where more rows are answered than the limit allows; the value is then a lower bound."""
        edit = self.settings.union(points)
        memo = ((edit.features, edit.clamps), concept, "forget_acc")
        rows = self.selections[concept]["forget_acc"]
        if memo in self._memo:
            return sum(self._memo[memo][r.id] for r in rows) / len(rows), True
        allowed = self.limits(concept)["forget_max"] * len(rows)  # type: ignore[operator]
        ok: dict[str, bool] = {}
        with edit.apply(self.lm.model):
            for batch in self.encoded[(concept, "forget_acc")]:
                ok.update(correctness(self.lm.model, [batch]))
                self.rows_scored += len(batch.rows)
                if sum(ok.values()) > allowed + 1e-9:
                    break
        self.evaluations += 1
        complete = len(ok) == len(rows)
        if complete:
            self._memo[memo] = ok
        return sum(ok.values()) / len(rows), complete

    def metrics(
        self, points: Mapping[str, Point], concept: str, parts: Sequence[str] = PARTS
    ) -> dict[str, float | None]:
        ok = self._correct(points, [(concept, p) for p in parts])
        return concept_metrics(ok, {p: self.selections[concept][p] for p in parts})

    def failures(self, concept: str, m: Mapping[str, float | None]) -> list[str]:
        """Why ``m`` misses this concept's limits (empty: it meets them all)."""
        lim, out = self.limits(concept), []
        forget = m.get("forget_acc")
        if forget is not None and forget > lim["forget_max"] + 1e-12:  # type: ignore[operator]
            out.append(f"{concept} forget {forget:.3f} > {lim['forget_max']:.3f}")
        for part in ("retain", "interference"):
            floor, got = lim[f"{part}_min"], m.get(f"{part}_acc")
            if floor is not None and got is not None and got < floor - 1e-12:
                out.append(f"{concept} {part} {got:.3f} < {floor:.3f}")
        return out

    def check(self, points: Mapping[str, Point], concepts: Sequence[str]) -> tuple[list[str], float]:
        """(failures, mean summary score) of the union edit over ``concepts`` with validation rows."""
        fails, scores = [], []
        for c in concepts:
            if not self.has_rows(c):
                continue
            m = self.metrics(points, c)
            fails += self.failures(c, m)
            scores.append(summary_score(m, self.original[c]))
        return fails, sum(scores) / max(len(scores), 1)

    def search_concept(
        self, concept: str, ranked: Mapping[str, Sequence[int]], context: Mapping[str, Point], phase: str
    ) -> tuple[Point | None, list[dict[str, Any]]]:
        """The best point for ``concept`` with ``context`` (the other concepts' points) in the same
        edit, and one table entry per point scored. With a context every concept must pass."""
        s = self.search
        checked = [concept, *context]
        clamps = [0.0] if self.settings.multiplier is not None else sorted(s.clamps, key=abs)
        pairs = [(n, m) for n in sorted(set(s.top_n)) for m in s.methods if m in ranked]
        best: tuple[Point, float] | None = None
        table: list[dict[str, Any]] = []
        tried: set[tuple[int, ...]] = set()
        for n, method in track(pairs, f"calibrate {concept}", self.progress):
            if best is not None and n > best[0].size:
                break  # every later point is larger than the best one
            features = tuple(ranked[method][:n])
            if not features or features in tried:
                continue  # fewer positive-scoring latents than n: the same edit as a smaller n
            tried.add(features)
            grid = [c for c in clamps if best is None or n * (1.0 + abs(c)) <= best[0].size]
            points = [Point(method, n, c, features) for c in grid]
            entries: dict[int, dict[str, Any]] = {}
            lo, hi = 0, len(points)
            while lo < hi:  # the first clamp of the grid that forgets
                mid = (lo + hi) // 2
                forget, complete = self.forget({**context, concept: points[mid]}, concept)
                fails = self.failures(concept, {"forget_acc": forget})
                entries[mid] = _entry(concept, phase, points[mid], forget, fails, complete)
                table.append(entries[mid])
                lo, hi = (lo, mid) if not fails else (mid + 1, hi)
            if lo == len(points):
                continue
            point, entry = points[lo], entries[lo]
            fails, score = self.check({**context, concept: point}, checked)
            entry.update(self.metrics({**context, concept: point}, concept))
            entry.update(score=round(score, 4), passed=not fails, why="; ".join(fails) or "meets every limit")
            if not fails and (best is None or (point.size, -score) < (best[0].size, -best[1])):
                best = (point, score)
        if best is not None:
            for e in table:
                if e["passed"] and (e["method"], e["top_n"], e["clamp"]) == (
                    best[0].method,
                    best[0].top_n,
                    best[0].clamp,
                ):
                    e.update(chosen=True, why="chosen: smallest edit meeting every limit")
        return (None if best is None else best[0]), table


def _sample(rows: list[Row], limit: int, rng: random.Random) -> list[Row]:
    return rows if len(rows) <= limit else rng.sample(rows, limit)


def _entry(
    concept: str,
    phase: str,
    point: Point,
    forget: float,
    fails: list[str],
    complete: bool,
) -> dict[str, Any]:
    why = "; ".join(fails) + ("" if complete else " (scoring stopped early: a lower bound)")
    return {
        "concept": concept,
        "phase": phase,
        "method": point.method,
        "top_n": point.top_n,
        "clamp": point.clamp,
        "features": list(point.features),
        "size": point.size,
        "forget_acc": forget,
        "retain_acc": None,
        "interference_acc": None,
        "score": None,
        "passed": False if fails else None,
        "chosen": False,
        "why": why if fails else "forgets; retain and interference scored next",
    }


def calibrate(
    validation: Validation,
    ranked: Mapping[str, Mapping[str, Sequence[int]]],
    fixed: Mapping[str, Point],
    searched: Sequence[str],
) -> dict[str, Any]:
    """Choose a point for every concept in ``searched`` (the others keep their ``fixed`` point), then
    check them all in one edit. Raises CalibrationFailed with the table when nothing passes."""
    start = time.time()
    table: list[dict[str, Any]] = []
    chosen: dict[str, Point] = dict(fixed)
    for concept in searched:
        if not validation.has_rows(concept):
            raise CalibrationFailed(f"no validation rows ask about {concept}: nothing to calibrate on", table)
        best, entries = validation.search_concept(concept, ranked[concept], {}, "alone")
        table += entries
        if best is None:
            raise CalibrationFailed(f"no point meets the gates on validation for {concept}", table)
        chosen[concept] = best
    everyone = list(chosen)
    fails, score = validation.check(chosen, everyone)
    table.append(_joint(chosen, fails, score))
    # One concept's edit can cost another its retain (or share its latents): search the failing
    # ones again, then the rest, each with every other concept's edit in place.
    failing = [c for c in searched if any(f.startswith(f"{c} ") for f in fails)]
    for concept in [*failing, *(c for c in searched if c not in failing)]:
        if not fails:
            break
        context = {c: p for c, p in chosen.items() if c != concept}
        best, entries = validation.search_concept(concept, ranked[concept], context, "joint")
        table += entries
        if best is not None:
            chosen[concept] = best
            fails, score = validation.check(chosen, everyone)
            table.append(_joint(chosen, fails, score))
    if fails:
        raise CalibrationFailed("the concepts' chosen points fail together: " + "; ".join(fails), table)
    return {
        "choices": {c: {**p.to_dict(), "calibrated": c in searched} for c, p in chosen.items()},
        "limits": {c: validation.limits(c) for c in everyone},
        "original": validation.original,
        "table": table,
        "evaluations": validation.evaluations,
        "rows_scored": validation.rows_scored,
        "seconds": round(time.time() - start, 1),
    }


def _joint(chosen: Mapping[str, Point], fails: list[str], score: float) -> dict[str, Any]:
    """A table entry for the union of every concept's point."""
    return {
        "concept": "all",
        "phase": "union",
        "method": "-",
        "top_n": None,
        "clamp": None,
        "features": union_features(p.features for p in chosen.values()),
        "size": sum(p.size for p in chosen.values()),
        "forget_acc": None,
        "retain_acc": None,
        "interference_acc": None,
        "score": round(score, 4),
        "passed": not fails,
        "chosen": not fails,
        "why": "; ".join(fails) or "every concept meets its limits in the one edit",
    }
