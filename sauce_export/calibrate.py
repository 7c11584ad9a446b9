"""Per-concept calibration on validation rows: which score, how many latents, which clamp (DESIGN §11).

Every choice the recipe leaves open is made here, on validation rows only; the evaluation file is
first read by ``verify``. Limits: forget_acc ``forget_margin`` under the verify gate's limit, retain
and interference at least ``hooked_keep + keep_margin`` of the original's. For one concept and each
(top_n, score): bisection over the clamp grid for the first clamp that forgets (forgetting grows as
the clamp goes more negative), refined in ``clamp_step`` steps, then a few deeper clamps while the
``compare`` summary score rises; the concept's candidates are its points meeting every limit, best
score first. Then unions of the concepts' candidates are checked in one edit, best ranks first, and
the first that meets every limit is folded (the recipe's fold, on training rows) and the fold scored
on the same validation rows: an edit whose fold strays from it would fail verify's fidelity gates,
so the next union is tried. Every hooked evaluation replays only the layers above the site
(``replay.py``). The margins keep a point that passes here from failing on another CPU's floating
point or on the evaluation rows' sampling.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sauce_export.data import Concept, Row
from sauce_export.edit import Edit
from sauce_export.errors import CalibrationFailed
from sauce_export.evaluate.metrics import (
    chance_accuracy,
    concept_metrics,
    metric_rows,
    summary_score,
)
from sauce_export.lm import Batch, LoadedModel, batches
from sauce_export.patch import Patch
from sauce_export.progress import track
from sauce_export.replay import Replay
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
    clamp_step: float
    deeper: int
    runner_ups: int
    fold_checks: int
    forget_margin: float
    keep_margin: float
    hooked_forget_margin: float
    hooked_keep: float
    sample_rows: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class FoldCheck:
    """How a union is folded (the recipe's fold on training rows) and verify's fold slacks."""

    fold: Callable[[Edit], Patch]
    forget_slack: float
    keep_slack: float


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
        self.replays: dict[tuple[str, str], Replay] = {}
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
                self.replays[(str(c), part)] = Replay(lm.model, settings.site, self.encoded[(str(c), part)])
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
        for part in parts:
            memo = (key, *part)
            if memo not in self._memo:
                self._memo[memo] = self.replays[part].correctness(edit)
                if edit is not None:
                    self.evaluations += 1
                    self.rows_scored += len(self._memo[memo])
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
        replay = self.replays[(concept, "forget_acc")]
        for i in range(len(replay)):
            ok.update(replay.correctness(edit, i, i + 1))
            self.rows_scored += replay.rows_in(i)
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

    def check(self, points: Mapping[str, Point], concepts: Sequence[str]) -> tuple[list[str], float | None]:
        """(failures, mean summary score) of the union edit over ``concepts`` with validation rows
        (score None: a forget set failed, the rest is not scored)."""
        with_rows = [c for c in concepts if self.has_rows(c)]
        for c in with_rows:  # forget first: scored batch by batch, it stops a failing union early
            forget, _ = self.forget(points, c)
            if self.failures(c, {"forget_acc": forget}):
                return self.failures(c, {"forget_acc": forget}), None
        fails, scores = [], []
        for c in with_rows:
            m = self.metrics(points, c)
            fails += self.failures(c, m)
            scores.append(summary_score(m, self.original[c]))
        return fails, sum(scores) / max(len(scores), 1)

    def entry(self, concept: str, point: Point, forget: float, complete: bool) -> dict[str, Any]:
        """A table entry for a point whose forget_acc is scored (passed None: it forgets, the rest
        is not scored yet)."""
        fails = self.failures(concept, {"forget_acc": forget})
        why = "; ".join(fails) + ("" if complete else " (scoring stopped early: a lower bound)")
        return {
            "concept": concept,
            "phase": "alone",
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
            "why": why if fails else "forgets",
        }

    def check_fold(
        self, points: Mapping[str, Point], concepts: Sequence[str], patch: Patch, check: FoldCheck
    ) -> tuple[list[str], float]:
        """(failures, mean summary score) of the folded union: every limit, and forget_acc at most
        half of verify's ``forget_slack`` over the hooked edit's, retain and interference at least
        the hooked edit's less half of ``keep_slack`` (the other halves are the margin)."""
        fails, scores = [], []
        with patch.apply(self.lm.model):
            folded = {
                c: {p: self.replays[(c, p)].full_correctness() for p in PARTS}
                for c in concepts
                if self.has_rows(c)
            }
        for c, ok in folded.items():
            m = concept_metrics({k: v for part in ok.values() for k, v in part.items()}, self.selections[c])
            hooked = self.metrics(points, c)
            fails += [f"folded {f}" for f in self.failures(c, m)]
            if m["forget_acc"] > hooked["forget_acc"] + check.forget_slack / 2 + 1e-12:  # type: ignore[operator]
                fails.append(
                    f"{c} folded forget {m['forget_acc']:.3f} > hooked {hooked['forget_acc']:.3f} + {check.forget_slack / 2:g}"
                )
            for part in ("retain_acc", "interference_acc"):
                got, ref = m[part], hooked[part]
                if got is not None and ref is not None and got < ref - check.keep_slack / 2 - 1e-12:
                    fails.append(
                        f"{c} folded {part[:-4]} {got:.3f} < hooked {ref:.3f} - {check.keep_slack / 2:g}"
                    )
            scores.append(summary_score(m, self.original[c]))
        return fails, sum(scores) / max(len(scores), 1)

    def score_point(
        self, points: Mapping[str, Point], concept: str, checked: Sequence[str]
    ) -> dict[str, Any]:
        """Retain and interference of a point that forgets, every checked concept's limits, the score."""
        fails, score = self.check(points, checked)
        return {
            **self.metrics(points, concept),
            "score": None if score is None else round(score, 4),
            "passed": not fails,
            "why": "; ".join(fails) or "meets every limit",
        }

    def search_concept(
        self, concept: str, ranked: Mapping[str, Sequence[int]]
    ) -> tuple[list[Point], list[dict[str, Any]]]:
        """This concept's points that meet every limit, best summary score first, and one table
        entry per point scored.

        Per (top_n, score): bisection over the clamp grid for the first clamp that forgets, then over
        ``clamp_step`` steps between it and the grid point before; from there up to ``deeper`` more
        negative clamps are scored while they keep meeting the limits and raise the score."""
        s = self.search
        if self.settings.multiplier is not None:
            grid: list[float] = [0.0]
        else:
            grid = sorted(s.clamps, key=abs)
        pairs = [(n, m) for n in sorted(set(s.top_n)) for m in s.methods if m in ranked]
        passing: list[tuple[float, Point]] = []
        table: list[dict[str, Any]] = []
        tried: set[tuple[int, ...]] = set()
        for n, method in track(pairs, f"calibrate {concept}", self.progress):
            features = tuple(ranked[method][:n])
            if not features or features in tried:
                continue  # fewer positive-scoring latents than n: the same edit as a smaller n
            tried.add(features)
            forgets = self._first_forgetting(concept, [Point(method, n, c, features) for c in grid], table)
            if forgets is None:
                continue
            k = grid.index(forgets.clamp)
            if k > 0:
                fine = clamps_between(grid[k - 1], grid[k], s.clamp_step)
                forgets = self._first_forgetting(
                    concept, [Point(method, n, c, features) for c in fine], table
                )
                assert forgets is not None  # the last fine clamp is grid[k], which forgets
            if s.clamp_step > 0:
                deeper = [forgets.clamp - s.clamp_step * i for i in range(1, s.deeper + 1)]
            else:
                deeper = [c for c in grid if c < forgets.clamp][: s.deeper]
            best_here = -1.0
            for c in [forgets.clamp, *(c for c in deeper if c >= min(grid))]:
                point = Point(method, n, c, features)
                entry = self.entry(concept, point, *self.forget({concept: point}, concept))
                entry.update(self.score_point({concept: point}, concept, [concept]))
                table.append(entry)
                if not entry["passed"] or entry["score"] <= best_here:
                    break  # a deeper clamp only costs more retain from here
                best_here = entry["score"]
                passing.append((entry["score"], point))
        passing.sort(key=lambda sp: (-sp[0], sp[1].size))
        # one point per set of latents (its best clamp): runner-ups that differ in more than the clamp
        best: dict[tuple[int, ...], Point] = {}
        for _, point in passing:
            best.setdefault(point.features, point)
        return list(best.values()), table

    def _first_forgetting(
        self, concept: str, points: Sequence[Point], table: list[dict[str, Any]]
    ) -> Point | None:
        """Bisection on the forget limit over ``points`` (ordered by growing |clamp|): the first that
        forgets, or None (forgetting grows as the clamp goes more negative). Every point scored but
        the returned one goes into ``table``."""
        lo, hi = 0, len(points)
        entries: dict[int, dict[str, Any]] = {}
        while lo < hi:
            mid = (lo + hi) // 2
            forget, complete = self.forget({concept: points[mid]}, concept)
            entries[mid] = self.entry(concept, points[mid], forget, complete)
            forgets = entries[mid]["passed"] is None
            lo, hi = (lo, mid) if forgets else (mid + 1, hi)
        table += [e for i, e in sorted(entries.items()) if i != lo]
        return points[lo] if lo < len(points) else None


def clamps_between(a: float, b: float, step: float) -> list[float]:
    """Clamps from just past ``a`` to ``b`` (included) in ``step`` steps, ordered by growing |clamp|."""
    if step <= 0 or abs(b) <= abs(a):
        return [b]
    out, c = [], a - step
    while c > b:
        out.append(c)
        c -= step
    return [*out, b]


def _sample(rows: list[Row], limit: int, rng: random.Random) -> list[Row]:
    return rows if len(rows) <= limit else rng.sample(rows, limit)


def calibrate(
    validation: Validation,
    ranked: Mapping[str, Mapping[str, Sequence[int]]],
    fixed: Mapping[str, Point],
    searched: Sequence[str],
    fold_check: FoldCheck | None = None,
) -> dict[str, Any]:
    """Choose a point for every concept in ``searched`` (the others keep their ``fixed`` point).

    Each concept is searched alone; then unions of each concept's best ``runner_ups + 1`` points
    are checked in one edit, best ranks first, and (with ``fold_check``) the first union meeting
    every limit is folded and the fold scored on the same rows: it must meet the limits too and stay
    within half of verify's slacks of the hooked edit, else the next union is tried (at most
    ``fold_checks`` folds). Raises CalibrationFailed with the table when nothing passes."""
    start = time.time()
    s = validation.search
    table: list[dict[str, Any]] = []
    candidates: dict[str, list[Point]] = {c: [p] for c, p in fixed.items()}
    for concept in searched:
        if not validation.has_rows(concept):
            raise CalibrationFailed(f"no validation rows ask about {concept}: nothing to calibrate on", table)
        found, entries = validation.search_concept(concept, ranked[concept])
        table += entries
        if not found:
            raise CalibrationFailed(f"no point meets the gates on validation for {concept}", table)
        candidates[concept] = found[: s.runner_ups + 1]
    everyone = list(candidates)
    ranks = sorted(
        itertools.product(*(range(len(candidates[c])) for c in everyone)), key=lambda r: (sum(r), max(r), r)
    )
    folds, patch, chosen, failed = 0, None, None, "no union of the concepts' points meets every limit"
    for rank in ranks:
        union = {c: candidates[c][i] for c, i in zip(everyone, rank, strict=True)}
        fails, score = validation.check(union, everyone)
        if fails:
            table.append(_union_entry("union", union, fails, score))
            continue
        if fold_check is None:
            table.append(_union_entry("union", union, fails, score))
            chosen = union
            break
        if folds == s.fold_checks:
            failed = f"{folds} folds of unions meeting every limit all stray from the hooked edit"
            break
        folds += 1
        table.append(_union_entry("union", union, fails, score, why="meets every limit; folded next"))
        patch = fold_check.fold(validation.settings.union(union))
        fails, score = validation.check_fold(union, everyone, patch, fold_check)
        table.append(_union_entry("fold", union, fails, score))
        if not fails:
            chosen = union
            break
    if chosen is None:
        raise CalibrationFailed(failed + " (table: every union tried)", table)
    table[-1]["chosen"] = True
    for e in table:
        if e["concept"] in chosen and e["passed"] and e["phase"] == "alone":
            p = chosen[e["concept"]]
            e["chosen"] = (e["method"], e["top_n"], e["clamp"]) == (p.method, p.top_n, p.clamp)
    return {
        "choices": {c: {**p.to_dict(), "calibrated": c in searched} for c, p in chosen.items()},
        "limits": {c: validation.limits(c) for c in everyone},
        "original": validation.original,
        "table": table,
        "evaluations": validation.evaluations,
        "rows_scored": validation.rows_scored,
        "folds": folds,
        "seconds": round(time.time() - start, 1),
        "patch": patch,
    }


def _union_entry(
    phase: str, points: Mapping[str, Point], fails: list[str], score: float | None, why: str = ""
) -> dict[str, Any]:
    """A table entry for the union of every concept's point (phase union: hooked, fold: folded)."""
    return {
        "concept": "all",
        "phase": phase,
        "method": "-",
        "top_n": None,
        "clamp": None,
        "features": union_features(p.features for p in points.values()),
        "size": sum(p.size for p in points.values()),
        "forget_acc": None,
        "retain_acc": None,
        "interference_acc": None,
        "score": None if score is None else round(score, 4),
        "passed": not fails,
        "chosen": False,
        "why": why or "; ".join(fails) or "every concept meets its limits in the one edit",
        "points": {c: f"{p.method} top {p.top_n} clamp {p.clamp:g}" for c, p in points.items()},
    }
