"""`sauce-export compare`: SAUCE's exported checkpoint against the weight-update baselines.

PEBench's settings (each concept alone, all at once, one person with one event) and columns
(forget/efficacy, generality, retain, interference/scope, utility on the world's text fact
questions or a given file), plus wall time and peak memory. Every baseline gets the same small
learning-rate sweep and is reported at its best point by one summary score, so no method wins by a
lucky setting:

    score = harmonic mean of clip(1 - forget/orig_forget), clip(retain/orig_retain),
            clip(interference/orig_interference), each clipped to [0, 1]

(averaged over the setting's concepts). A harmonic mean is 0 when any term is 0: forgetting by
destroying the model, or keeping the model by forgetting nothing, both score 0.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import json
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from sauce_export.data import Concept, Row, hold_out, read_rows
from sauce_export.errors import InputError
from sauce_export.evaluate.attack_report import attack_table, fewest_steps, relearn_plot, robust_within
from sauce_export.evaluate.attacks import AttackConfig, AttackData, attack_data, attack_model
from sauce_export.evaluate.baselines import (
    METHODS,
    BaselineConfig,
    TrainData,
    encode_train_data,
    forget_retain_rows,
    unlearn,
)
from sauce_export.evaluate.metrics import (
    METRICS,
    concept_metrics,
    correctness,
    metric_rows,
    summary_score,
)
from sauce_export.lm import Batch, LoadedModel, batches, load_model
from sauce_export.patch import Patch
from sauce_export.recipe import Recipe
from sauce_export.subspace import SubspaceFit, fit_for_run
from sauce_export.verify import with_context

T = TypeVar("T")
# The demo model is small and was trained hard: at 1e-5..3e-5 full fine-tuning did not move its
# answers within the step budget (measured), so both grids start where the loss starts to act.
LRS_FULL = (1e-4, 3e-4, 1e-3)
LRS_LORA = (3e-4, 1e-3, 3e-3)
STEPS = (20, 40, 60)
"""The steps at which each baseline run is scored on validation rows (it trains for the last)."""
VALIDATION_ROWS = 128
"""Retain and interference rows per concept scored on validation at most (a seeded sample)."""
MEMORY_NOTE = (
    "peak resident set size (RSS, sampled every 5 ms from /proc/self/statm) minus RSS at start, "
    "after malloc_trim returned freed heap to the OS"
)


# ---------------------------------------------------------------------------- scoring
def settings(concepts: Sequence[Concept]) -> dict[str, list[Concept]]:
    """PEBench's settings for a recipe's concepts: each alone, all together, a person with an event."""
    out = {f"single {c}": [c] for c in concepts}
    if len(concepts) > 1:
        out["multi"] = list(concepts)
    person = next((c for c in concepts if c.kind == "person"), None)
    event = next((c for c in concepts if c.kind == "event"), None)
    if person and event and len(concepts) > 2:
        out["both"] = [person, event]
    return out


# ---------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak RSS growth over a block: torch's CPU tensors bypass tracemalloc, so sample the process."""

    def __enter__(self) -> PeakRSS:
        with contextlib.suppress(OSError):  # give freed heap back, else reused pages hide growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)


def measured(fn: Callable[[], T]) -> tuple[T, float, float]:
    """(result, wall seconds, peak RSS growth in MiB)."""
    start = time.perf_counter()
    with PeakRSS() as mem:
        result = fn()
    return result, round(time.perf_counter() - start, 2), mem.delta_mb


@dataclasses.dataclass
class EvalSet:
    """What one setting is scored on: metric row selections per concept, plus the utility rows."""

    selections: dict[str, dict[str, list[Row]]]
    facts: list[Row]
    encoded: list[Batch]

    def score(self, model: torch.nn.Module, original: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
        return self.score_correct(correctness(model, self.encoded), original)

    def score_correct(
        self, ok: dict[str, bool], original: dict[str, dict[str, Any]] | None
    ) -> dict[str, Any]:
        """The score from row correctness found elsewhere (llama.cpp's: evaluate/gguf.py)."""
        per = {name: concept_metrics(ok, sel) for name, sel in self.selections.items()}
        result: dict[str, Any] = {
            "concepts": per,
            "utility_acc": sum(ok[r.id] for r in self.facts) / len(self.facts) if self.facts else None,
        }
        if original is not None:
            scores = [summary_score(per[n], original[n]) for n in per]
            result["score"] = sum(scores) / len(scores)
        return result


def utility_rows(recipe: Recipe, path: Path | None) -> tuple[list[Row], str]:
    """(rows, what they are) for the utility column: every row of ``path`` when given, else the world's
    text fact questions (``facts.jsonl`` beside ``data.train``, split ``facts``), else none - a text
    model's own data has no questions outside its concepts' reach, so utility is then not measured."""
    if path is not None:
        return read_rows(path), f"every row of {path}"
    facts_path = Path(recipe.data.train).parent / "facts.jsonl"
    if not facts_path.is_file():
        return [], f"not measured (no {facts_path} and no --utility file)"
    facts = [r for r in read_rows(facts_path) if r.split == "facts"]
    if not facts:
        raise InputError(str(facts_path), "split", "no rows with split 'facts' (the utility questions)")
    return facts, f"the world's text fact questions ({facts_path}, split facts)"


@dataclasses.dataclass
class SettingRows:
    """The rows one setting trains on (``forget``, ``retain``) and is scored on (``selections``)."""

    concepts: list[Concept]
    selections: dict[str, dict[str, list[Row]]]
    forget: list[Row]
    retain: list[Row]


def setting_rows(
    train_rows: Sequence[Row], eval_rows: Sequence[Row], concepts: Sequence[Concept], recipe: Recipe
) -> SettingRows:
    """A setting's rows, each side checked: an empty one is an InputError naming the data file. A
    score needs forget and retain questions (forgetting alone is won by destroying the model), and
    the baselines need train rows of both kinds."""
    split = recipe.eval.forget_split
    selections = {}
    for c in concepts:
        sel = metric_rows(eval_rows, c, split, recipe.eval.generality_split, removed=concepts)
        if not sel["forget_acc"]:
            problem = f"no {split} questions about {c} (nothing to forget)"
            raise InputError(recipe.data.eval, "labels", problem)
        if not sel["retain_acc"]:
            problem = f"no {split} questions about a {c.kind} other than {c.name!r} (nothing to retain)"
            raise InputError(recipe.data.eval, "labels", problem)
        selections[str(c)] = sel
    forget, retain = forget_retain_rows(train_rows, concepts)
    names = ", ".join(map(str, concepts))
    if not forget:
        problem = f"no split 'train' question about {names} (about = kind, labels[kind] = name)"
        raise InputError(recipe.data.train, "labels", f"{problem}: the baselines have nothing to forget")
    if not retain:
        problem = f"no split 'train' rows besides the questions about {names}"
        raise InputError(recipe.data.train, "split", f"{problem}: the baselines have nothing to retain")
    return SettingRows(list(concepts), selections, forget, retain)


def eval_set(lm: LoadedModel, rows: SettingRows, facts: Sequence[Row], batch_size: int) -> EvalSet:
    wanted = {r.id: r for sel in rows.selections.values() for chosen in sel.values() for r in chosen}
    wanted.update({r.id: r for r in facts})
    encoded = list(batches(lm, list(wanted.values()), batch_size))
    return EvalSet(rows.selections, list(facts), encoded)


# ---------------------------------------------------------------------------- attacks
@dataclasses.dataclass
class AttackSuite:
    """A setting's attacks: shared relearning data and probes, the plain and the context-prefixed
    evaluation sets, and the original model's score on each (the attacks' references)."""

    cfg: AttackConfig
    data: AttackData
    evals: EvalSet
    context: EvalSet
    original: dict[str, Any]
    context_original: dict[str, Any]

    def run(self, model: torch.nn.Module, log: Callable[[str], None]) -> dict[str, Any]:
        return attack_model(
            model,
            self.data,
            self.cfg,
            original=self.original["concepts"],
            score=lambda m: self.evals.score(m, self.original["concepts"]),
            score_context=lambda m: self.context.score(m, self.context_original["concepts"]),
            log=log,
        )


def attack_suite(
    lm: LoadedModel,
    rows: SettingRows,
    validation: Sequence[Row],
    eval_rows: Sequence[Row],
    cfg: AttackConfig,
    batch_size: int,
) -> AttackSuite:
    """Everything the attacks on one setting share, built once for every method's model: the
    evaluation rows with retain and interference sampled to ``cfg.eval_rows`` per concept, the same
    rows behind unrelated context (an evaluation question and its answer about nothing removed)."""
    rng = random.Random(cfg.seed)
    sampled = {
        c: {
            m: v if m in ("forget_acc", "generality_acc") else rng.sample(v, min(cfg.eval_rows, len(v)))
            for m, v in sel.items()
        }
        for c, sel in rows.selections.items()
    }
    pool = [r for r in eval_rows if not any(c.matches(r) for c in rows.concepts)]
    prefixed = {
        c: {m: with_context(chosen, pool, cfg.seed) for m, chosen in sel.items()}
        for c, sel in sampled.items()
    }
    evals = eval_set(lm, dataclasses.replace(rows, selections=sampled), [], batch_size)
    context = eval_set(lm, dataclasses.replace(rows, selections=prefixed), [], batch_size)
    forget = {c: rows.selections[str(c)]["forget_acc"] for c in rows.concepts}
    data = attack_data(lm, rows.forget, rows.retain, validation, forget, cfg, batch_size)
    return AttackSuite(cfg, data, evals, context, evals.score(lm.model, None), context.score(lm.model, None))


# ---------------------------------------------------------------------------- SAUCE
def _same_upstream(a: dict[str, Any], recipe: Recipe) -> bool:
    mine = json.loads(json.dumps(dataclasses.asdict(recipe), default=str))
    return all(a.get(k) == mine.get(k) for k in ("model", "site", "data", "collect", "sae"))


def sauce_checkpoint(recipe: Recipe, concepts: Sequence[Concept], run_dir: Path, out: Path) -> dict[str, Any]:
    """The exported SAUCE checkpoint for ``concepts``: the reused run's own when its concepts match,
    else a fold + export of those concepts alone, reusing the run's activations and SAE."""
    from sauce_export.pipeline import Run

    stages = ("collect", "train-sae", "select", "fold", "export")

    def seconds(directory: Path) -> float:
        return round(
            sum(json.loads((directory / s / "stage.json").read_text())["seconds"] for s in stages), 2
        )

    report = json.loads((run_dir / "report.json").read_text())
    if [str(c) for c in concepts] == [f"{c['kind']}:{c['name']}" for c in report["concepts"]]:
        return {
            "path": report["export"]["path"],
            "seconds": seconds(run_dir),
            "peak_mb": None,
            "reused": True,
        }
    entries = [e for e in recipe.concepts if e.concept() in concepts]
    sub = dataclasses.replace(recipe, concepts=entries)
    target = out / "sauce" / "_".join(f"{c.kind}-{c.name}" for c in concepts)
    target.mkdir(parents=True, exist_ok=True)
    if _same_upstream(report["recipe"], recipe):  # the activations and the SAE do not depend on concepts
        for stage in ("collect", "train-sae"):
            link = target / stage
            if not link.exists():
                link.symlink_to((run_dir / stage).resolve(), target_is_directory=True)
    run = Run(sub, target, progress=False)
    exported, _, peak = measured(run.export)
    return {"path": exported["path"], "seconds": seconds(target), "peak_mb": peak, "reused": False}


def subspace_entry(
    recipe: Recipe,
    lm: LoadedModel,
    run_dir: Path,
    concepts: Sequence[Concept],
    train_rows: Sequence[Row],
    steps: Sequence[int],
    batch_size: int,
    seed: int,
    validation: EvalSet,
    reference: dict[str, dict[str, Any]],
    scorer: Scorer,
) -> dict[str, Any]:
    """The "SAUCE subspace" row: the patch on the run's SAE and latents (at the run's validation
    choice of latents and lr), fitted on the baselines' train rows and batch for max(steps) steps,
    its steps chosen on validation rows like a baseline's; scored in memory (its export is exact)."""
    cfg = dataclasses.replace(recipe.subspace, steps=max(steps), batch_size=batch_size, seed=seed)
    sweep: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -1.0}

    def checkpoint(done: int, fit: SubspaceFit) -> bool:
        score = validation.score(fit.model, reference)["score"]
        sweep.append({"hparams": {"steps": done}, "validation_score": score})
        if score > best["score"]:
            best.update(score=score, steps=done, A=fit.a.detach().cpu().clone())
        return False

    patch, secs, peak = measured(
        lambda: fit_for_run(
            lm, run_dir, recipe.site, concepts, train_rows, cfg, recipe.select.method, steps, checkpoint
        )
    )
    chosen = Patch((dataclasses.replace(patch.deltas[0], A=best["A"]),), patch.description)
    desc = patch.description
    hp = {
        "latents": max(len(f) for f in desc["latents"].values()),
        "lr": desc["lr"],
        "steps": best["steps"],
        "batch_size": batch_size,
    }
    point = {"hparams": hp, "validation_score": best["score"], "seconds": secs, "peak_mb": peak}
    with chosen.apply(lm.model):
        return scorer.score("SAUCE subspace", lm.model, point, sweep)


# ---------------------------------------------------------------------------- the comparison
def train_validation(recipe: Recipe) -> tuple[list[Row], list[Row], str]:
    """(train rows, validation rows, where validation comes from): ``data.validation`` when given,
    else the run's own deterministic carve-out of ``data.train`` (so no baseline trains on it)."""
    data = recipe.data
    if data.validation:
        return read_rows(data.train), read_rows(data.validation), data.validation
    train, held = hold_out(read_rows(data.train), data.validation_share)
    return train, held, f"carved out of {data.train}: {data.validation_share:.0%} of each answer's images"


def validation_set(
    lm: LoadedModel, rows: SettingRows, validation: Sequence[Row], batch_size: int, seed: int
) -> EvalSet:
    """The setting's metric rows on the validation split (every split of the file), retain and
    interference each a seeded sample of at most VALIDATION_ROWS: what every choice is made on."""
    rng = random.Random(seed)
    selections = {}
    for c in rows.concepts:
        sel = metric_rows(validation, c, None, None, removed=rows.concepts)
        selections[str(c)] = {m: rng.sample(v, min(VALIDATION_ROWS, len(v))) for m, v in sel.items()}
    return eval_set(lm, dataclasses.replace(rows, selections=selections), [], batch_size)


@dataclasses.dataclass
class Tuned:
    """A baseline at the point (learning rate x steps) with the best validation score."""

    model: torch.nn.Module
    hparams: dict[str, Any]
    validation_score: float
    seconds: float
    peak_mb: float
    sweep: list[dict[str, Any]]


def tune(
    lm: LoadedModel,
    data: TrainData,
    method: str,
    lora: bool,
    lrs: Sequence[float],
    steps: Sequence[int],
    validation: EvalSet,
    reference: dict[str, dict[str, Any]],
    budget: dict[str, Any],
) -> Tuned:
    """Train one run per learning rate for max(steps) steps, score the validation rows after each of
    ``steps`` against the original's ``reference`` metrics there, keep a copy of the best student;
    the evaluation rows are never looked at here."""
    sweep: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -1.0}

    def checkpoint(done: int, student: torch.nn.Module, lr: float) -> None:
        if done not in steps:
            return
        score = validation.score(student, reference)["score"]
        sweep.append({"hparams": {"lr": lr, "steps": done}, "validation_score": score})
        if score > best["score"]:
            best.update(score=score, lr=lr, steps=done, model=copy.deepcopy(student))

    for lr in lrs:
        cfg = BaselineConfig(
            method, lora, max(steps), lr, budget["batch_size"], budget["beta"], budget["seed"]
        )  # type: ignore[arg-type]
        (_, losses), secs, peak = measured(
            lambda cfg=cfg, lr=lr: unlearn(lm.model, data, cfg, lambda d, m: checkpoint(d, m, lr))
        )
        for point in sweep:
            if point["hparams"]["lr"] == lr:
                point.update(seconds=secs, peak_mb=peak, final_loss=round(losses[-1], 4))
    model = best["model"].merge_and_unload() if lora else best["model"]
    for p in model.parameters():
        p.requires_grad_(False)
    hp = {"lr": best["lr"], "steps": best["steps"], "batch_size": budget["batch_size"], "lora": lora}
    if method == "NPO":
        hp["beta"] = budget["beta"]
    chosen = next(p for p in sweep if p["hparams"] == {"lr": best["lr"], "steps": best["steps"]})
    return Tuned(model.eval(), hp, best["score"], chosen["seconds"], chosen["peak_mb"], sweep)


@dataclasses.dataclass
class Scorer:
    """Scores a setting's chosen models once on the evaluation rows, then attacks them."""

    setting: str
    evals: EvalSet
    original: dict[str, dict[str, Any]]
    suite: AttackSuite | None
    log: Callable[[str], None]

    def score(
        self, method: str, model: torch.nn.Module, point: dict[str, Any], sweep: list[dict[str, Any]]
    ) -> dict[str, Any]:
        best = {**self.evals.score(model, self.original), **point}
        self.log(f"[{self.setting}] {method}: score {best['score']:.3f}")
        scored: dict[str, Any] = {"best": best, "sweep": sweep}
        if self.suite is not None:
            scored["attacks"] = self.suite.run(model, lambda m: self.log(f"[{self.setting}] {method} {m}"))
        return scored


def compare(
    recipe: Recipe,
    out: Path,
    run_dir: Path,
    *,
    only: Sequence[str] = ("single", "multi", "both"),
    methods: Sequence[str] = METHODS,
    steps: Sequence[int] = STEPS,
    batch_size: int = 16,
    beta: float = 0.1,
    seed: int = 0,
    lrs_full: Sequence[float] = LRS_FULL,
    lrs_lora: Sequence[float] = LRS_LORA,
    utility: Path | None = None,
    attacks: AttackConfig | None = None,
    subspace: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score SAUCE's checkpoint and every baseline on each setting; writes OUT/compare.{json,md,png}.
    Each baseline's learning rate x steps is chosen on validation rows; the evaluation rows are
    scored once, on the chosen model. ``utility``: a JSONL file of general questions for the utility
    column (default: see utility_rows). ``attacks``: also attack every method's model (docs/attack.md).
    ``subspace``: also the subspace patch (docs/subspace.md) on the baselines' steps and batch."""
    if not (run_dir / "report.json").is_file():
        raise InputError(str(run_dir), "--run", "no report.json here: run `sauce-export run` first")
    train_rows, validation, validation_note = train_validation(recipe)
    eval_rows = read_rows(recipe.data.eval)
    facts, utility_note = utility_rows(recipe, utility)
    concepts = [c.concept() for c in recipe.concepts]
    plans = {  # every setting's rows are checked before anything is loaded or trained
        name: setting_rows(train_rows, eval_rows, chosen, recipe)
        for name, chosen in settings(concepts).items()
        if name.split()[0] in only
    }
    where = recipe.data.validation or recipe.data.train
    for plan in plans.values():
        for c in plan.concepts:
            if not metric_rows(validation, c, None, None)["forget_acc"]:
                raise InputError(where, "labels", f"no validation questions about {c}: nothing to choose on")
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(recipe.model, where=recipe.path)
    budget = {
        "steps": list(steps),
        "batch_size": batch_size,
        "beta": beta,
        "seed": seed,
        "lrs_full": list(lrs_full),
        "lrs_lora": list(lrs_lora),
        "lora_r": 8,
    }
    result: dict[str, Any] = {
        "recipe": recipe.path,
        "run": str(run_dir),
        "utility": utility_note,
        "validation": validation_note,
        "memory": MEMORY_NOTE,
        "budget": budget,
        "attack_config": None if attacks is None else dataclasses.asdict(attacks),
        "settings": {},
    }
    for name, rows in plans.items():
        chosen = rows.concepts
        log(f"[{name}] encoding")
        evals = eval_set(lm, rows, facts, recipe.eval.batch_size)
        valid = validation_set(lm, rows, validation, recipe.eval.batch_size, seed)
        reference = valid.score(lm.model, None)["concepts"]
        original = evals.score(lm.model, None)
        data = encode_train_data(lm, rows.forget, rows.retain, max(steps), batch_size, seed)
        suite = None
        if attacks is not None:
            suite = attack_suite(lm, rows, validation, eval_rows, attacks, recipe.eval.batch_size)
        entry: dict[str, Any] = {"concepts": [str(c) for c in chosen], "original": original, "methods": {}}
        result["settings"][name] = entry
        scorer = Scorer(name, evals, original["concepts"], suite, log)
        sauce = sauce_checkpoint(recipe, chosen, run_dir, out)
        model = load_model(sauce["path"], where="export").model
        entry["methods"]["SAUCE (exported)"] = scorer.score(
            "SAUCE (exported)", model, {**sauce, "hparams": {}}, []
        )
        write_outputs(result, out)
        if subspace:
            fit = (lm, run_dir, chosen, train_rows, steps, batch_size, seed)
            entry["methods"]["SAUCE subspace"] = subspace_entry(recipe, *fit, valid, reference, scorer)
            write_outputs(result, out)
        for method in methods:
            for lora, lrs in ((False, lrs_full), (True, lrs_lora)):
                tuned = tune(lm, data, method, lora, lrs, steps, valid, reference, budget)
                point = {
                    "hparams": tuned.hparams,
                    "validation_score": tuned.validation_score,
                    "seconds": tuned.seconds,
                    "peak_mb": tuned.peak_mb,
                }
                label = f"{method} ({'LoRA' if lora else 'full'})"
                entry["methods"][label] = scorer.score(label, tuned.model, point, tuned.sweep)
                write_outputs(result, out)
    return result


# ---------------------------------------------------------------------------- outputs
def _mean(per: dict[str, dict[str, float | None]], metric: str) -> float | None:
    values = [m[metric] for m in per.values() if m[metric] is not None]
    return sum(values) / len(values) if values else None


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# SAUCE vs weight-update unlearning baselines",
        "",
        f"Recipe `{result['recipe']}`, SAUCE run `{result['run']}`. Accuracies are exact greedy answers "
        "on the eval data's forget split (forget, retain, interference) and generality split "
        f"(paraphrases), means over the setting's concepts; utility: {result['utility']}. Score = harmonic mean of "
        "(1 - forget/orig), retain/orig, interference/orig, each clipped to [0, 1]. Baselines: the "
        "learning rate x steps with the best score on validation rows "
        f"({result.get('validation', 'not recorded')}), then scored once on the evaluation rows; budget "
        f"{json.dumps(result['budget'])}. Memory: {result['memory']}.",
        "",
    ]
    if result.get("attack_config"):
        lines += [
            "Attacks (docs/attack.md): each cell is the score after the attack and, in "
            "brackets, the mean forget accuracy; robust = the score after the worst attack. Attack budget "
            f"{json.dumps(result['attack_config'])}.",
            "",
        ]
    head = [
        "method",
        "hparams",
        *(m.replace("_acc", "") for m in METRICS),
        "utility",
        "score",
        "time s",
        "peak MiB",
    ]
    for name, entry in result["settings"].items():
        lines += [
            f"## {name}: {', '.join(entry['concepts'])}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        rows = [("original", {**entry["original"], "hparams": {}, "seconds": None, "peak_mb": None})]
        rows += [(m, v["best"]) for m, v in entry["methods"].items()]
        for method, p in rows:
            hp = ", ".join(
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in p["hparams"].items()
                if k not in ("lora",)
            )
            cells = [
                method,
                hp,
                *(_fmt(_mean(p["concepts"], m)) for m in METRICS),
                _fmt(p["utility_acc"]),
                _fmt(p.get("score")),
                _fmt(p.get("seconds"), 1),
                _fmt(p.get("peak_mb"), 1),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        table = attack_table(entry["methods"])
        if table:
            lines += [f"### {name}: attacks", "", *table, ""]
    return "\n".join(lines)


README_BEGIN = "<!-- compare:begin (generated by `sauce-export compare-readme`; do not edit) -->"
README_END = "<!-- compare:end -->"


def summary_markdown(result: dict[str, Any]) -> str:
    """One row per setting: SAUCE's score, the best baseline, and every baseline's full / LoRA best."""
    names = {m for e in result["settings"].values() for m in e["methods"]}
    methods = sorted({m.rsplit(" (", 1)[0] for m in names if not m.startswith("SAUCE")})
    sub = ["SAUCE subspace"] if "SAUCE subspace" in names else []
    robust = any("attacks" in v for e in result["settings"].values() for v in e["methods"].values())
    light = {
        n
        for e in result["settings"].values()
        for v in e["methods"].values()
        if "attacks" in v and (n := fewest_steps(v)) is not None
    }
    within = f" ({min(light)} relearning steps / all)" if light else ""
    extra = [f"SAUCE robust{within}", f"best baseline robust{within}"] if robust else []
    head = [
        "setting",
        "SAUCE (exported)",
        *sub,
        "best baseline",
        *extra,
        *(f"{m} full / LoRA" for m in methods),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in result["settings"].items():
        best = {m: v["best"] for m, v in entry["methods"].items()}
        baselines = {m: p for m, p in best.items() if not m.startswith("SAUCE")}
        top = max(baselines.values(), key=lambda p: p["score"]) if baselines else None
        winners = [
            m.replace(" (", " ").rstrip(")")
            for m, p in baselines.items()
            if top and p["score"] == top["score"]
        ]
        cells = [
            name if name.startswith("single ") else f"{name}: {', '.join(entry['concepts'])}",
            _fmt(best["SAUCE (exported)"]["score"]),
            *(_fmt(best[m]["score"]) if m in best else "-" for m in sub),
            f"{_fmt(top['score'])} ({', '.join(winners)})" if top else "-",
            *(_robust(entry["methods"]) if robust else []),
            *(
                " / ".join(_fmt(best.get(f"{m} ({kind})", {}).get("score")) for kind in ("full", "LoRA"))
                for m in methods
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    budget = result["budget"]
    attacks = result.get("attack_configs") or {
        result.get("source", "compare.json"): result.get("attack_config")
    }
    lines += [
        "",
        f"Scores (higher is better) from `{result.get('source', 'compare.json')}`; every baseline at the "
        f"learning rate x steps with the best score on validation rows (full {', '.join(f'{x:g}' for x in budget['lrs_full'])}; "
        f"LoRA r={budget['lora_r']} {', '.join(f'{x:g}' for x in budget['lrs_lora'])}; steps {_steps(budget['steps'])} "
        f"of batch {budget['batch_size']}), NPO beta {budget['beta']:g}, seed {budget['seed']}; the evaluation rows "
        "scored once."
        + (
            f" Robust: the score after the worst attack (docs/attack.md){_relearn_budget(attacks)}."
            if robust
            else ""
        ),
    ]
    return "\n".join(lines)


def _relearn_budget(configs: dict[str, dict[str, Any] | None]) -> str:
    """'; relearning ...' per source with attacks (all sources' when they differ, else once)."""

    def one(cfg: dict[str, Any]) -> str:
        lrs = " / ".join(", ".join(f"{x:g}" for x in cfg[k]) or "none" for k in ("lrs_full", "lrs_lora"))
        return f"relearning lr {lrs} (full / LoRA), scored at {_steps(list(cfg['steps']))} steps"

    found = {src: one(cfg) for src, cfg in configs.items() if cfg}
    if len(set(found.values())) <= 1:
        return "".join(f"; {text}" for text in set(found.values()))
    return "".join(f"; `{src}`: {text}" for src, text in found.items())


def _steps(steps: int | list[int]) -> str:
    return ", ".join(map(str, steps)) if isinstance(steps, list) else str(steps)


def _robust(methods: dict[str, dict[str, Any]]) -> list[str]:
    """(SAUCE's robust score, the best baseline's with its name) for the README's summary row, each
    as "after the fewest relearning steps / after every attack" where relearning ran: with the full
    budget every method can score 0, and the lighter attacker is what tells them apart."""
    attacked = {m: v for m, v in methods.items() if "attacks" in v}
    fewest = min((n for v in attacked.values() if (n := fewest_steps(v)) is not None), default=None)

    def cell(v: dict[str, Any]) -> tuple[float, ...]:
        full = v["attacks"]["robust_score"]
        return (full,) if fewest is None else (robust_within(v, fewest), full)

    scores = {m: cell(v) for m, v in attacked.items()}
    sauce = scores.pop("SAUCE (exported)", None)
    scores = {m: v for m, v in scores.items() if not m.startswith("SAUCE")}
    show = " / ".join
    out = [show(map(_fmt, sauce)) if sauce else "-"]
    if not scores:
        return [*out, "-"]
    parts = []
    for i in range(len(next(iter(scores.values())))):
        top = max(v[i] for v in scores.values())
        names = [m.replace(" (", " ").rstrip(")") for m, v in scores.items() if v[i] == top]
        who = "all" if len(names) == len(scores) > 1 else ", ".join(names)
        parts.append(f"{_fmt(top)} ({who})")
    return [*out, show(parts)]


def merged(paths: Sequence[Path]) -> dict[str, Any]:
    """One result from several compare.json files (e.g. the multi setting with the full attack budget
    and the others with a smaller one): their settings in order, one table. Their baselines must share
    one budget (one footnote states it); each file's attack budget is kept for the footnote."""
    out: dict[str, Any] = {}
    for path in paths:
        try:
            result = json.loads(path.read_text())
            settings, budget = result["settings"], result["budget"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(str(path), "settings", f"not a compare.json ({err})") from None
        if not out:
            out = {**result, "settings": {}, "source": str(path), "attack_configs": {}}
        elif budget != out["budget"]:
            raise InputError(
                str(path), "budget", f"differs from {out['source'].split(',')[0]}'s: one table, one budget"
            )
        else:
            out["source"] += f", {path}"
        for name, entry in settings.items():
            if name in out["settings"]:
                raise InputError(str(path), "settings", f"{name!r} is already in {out['source']}")
            out["settings"][name] = entry
        out["attack_configs"][str(path)] = result.get("attack_config")
    return out


def update_readme(readme: Path, compare_json: Path, *more: Path) -> None:
    """Replace the text between the README's compare markers with the summary of ``compare_json``
    (and of ``more`` files, merged into the same table)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise InputError(str(readme), "compare markers", f"add the lines {README_BEGIN} and {README_END}")
    result = merged([compare_json, *more])
    try:
        table = summary_markdown(result)
    except (KeyError, TypeError) as err:
        raise InputError(result["source"], "settings", f"not a compare.json ({err})") from None
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")
    tmp.replace(readme)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(markdown(result))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        entry = result["settings"][name]
        points = [("original", entry["original"])] + [(m, v["best"]) for m, v in entry["methods"].items()]
        for i, (method, p) in enumerate(points):
            x, y = _mean(p["concepts"], "forget_acc"), _mean(p["concepts"], "retain_acc")
            marker = "*" if method.startswith("SAUCE") else ("s" if "LoRA" in method else "o")
            colour = {"original": "black"}.get(
                method, "crimson" if marker == "*" else plt.get_cmap("tab20")(i % 20)
            )
            ax.scatter(x, y, marker=marker, s=140 if marker == "*" else 40, color=colour, label=method)
        ax.set(
            title=name,
            xlabel="forget acc (lower better)",
            ylabel="retain acc",
            xlim=(-0.05, 1.05),
            ylim=(-0.05, 1.05),
        )
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    relearn_plot({n: e["methods"] for n, e in result["settings"].items()}, out / "compare-relearn.png")
