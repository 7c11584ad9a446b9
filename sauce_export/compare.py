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
import ctypes
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from sauce_export.data import Concept, Row, read_rows
from sauce_export.errors import InputError
from sauce_export.evaluate.attacks import AttackConfig, AttackData, attack_data, attack_model
from sauce_export.evaluate.baselines import (
    METHODS,
    BaselineConfig,
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
from sauce_export.recipe import Recipe
from sauce_export.verify import with_context

T = TypeVar("T")
# The demo model is small and was trained hard: at 1e-5..3e-5 full fine-tuning did not move its
# answers within the step budget (measured), so both grids start where the loss starts to act.
LRS_FULL = (1e-4, 3e-4, 1e-3)
LRS_LORA = (3e-4, 1e-3, 3e-3)
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
        ok = correctness(model, self.encoded)
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

    def run(
        self, model: torch.nn.Module, before: dict[str, Any], log: Callable[[str], None]
    ) -> dict[str, Any]:
        return attack_model(
            model,
            self.data,
            self.cfg,
            before=before,
            original=self.original["concepts"],
            score=lambda m: self.evals.score(m, self.original["concepts"]),
            score_context=lambda m: self.context.score(m, self.context_original["concepts"]),
            log=log,
        )


def attack_suite(
    lm: LoadedModel,
    rows: SettingRows,
    evals: EvalSet,
    validation: Sequence[Row],
    eval_rows: Sequence[Row],
    cfg: AttackConfig,
    batch_size: int,
) -> AttackSuite:
    """Everything the attacks on one setting share, built once for every method's model. The context
    attack puts an unrelated evaluation question and its answer (nothing removed) before each row."""
    pool = [r for r in eval_rows if not any(c.matches(r) for c in rows.concepts)]
    prefixed = {
        c: {m: with_context(chosen, pool, cfg.seed) for m, chosen in sel.items()}
        for c, sel in rows.selections.items()
    }
    context = eval_set(lm, dataclasses.replace(rows, selections=prefixed), [], batch_size)
    forget = {c: rows.selections[str(c)]["forget_acc"] for c in rows.concepts}
    data = attack_data(lm, rows.forget, rows.retain, validation, forget, cfg, batch_size)
    original = evals.score(lm.model, None)
    return AttackSuite(cfg, data, evals, context, original, context.score(lm.model, None))


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


# ---------------------------------------------------------------------------- the comparison
def compare(
    recipe: Recipe,
    out: Path,
    run_dir: Path,
    *,
    only: Sequence[str] = ("single", "multi", "both"),
    methods: Sequence[str] = METHODS,
    steps: int = 60,
    batch_size: int = 16,
    beta: float = 0.1,
    seed: int = 0,
    lrs_full: Sequence[float] = LRS_FULL,
    lrs_lora: Sequence[float] = LRS_LORA,
    utility: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score SAUCE's checkpoint and every baseline on each setting; writes OUT/compare.{json,md,png}.
    ``utility``: a JSONL file of general questions for the utility column (default: see utility_rows)."""
    if not (run_dir / "report.json").is_file():
        raise InputError(str(run_dir), "--run", "no report.json here: run `sauce-export run` first")
    train_rows, eval_rows = read_rows(recipe.data.train), read_rows(recipe.data.eval)
    facts, utility_note = utility_rows(recipe, utility)
    concepts = [c.concept() for c in recipe.concepts]
    plans = {  # every setting's rows are checked before anything is loaded or trained
        name: setting_rows(train_rows, eval_rows, chosen, recipe)
        for name, chosen in settings(concepts).items()
        if name.split()[0] in only
    }
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(recipe.model, where=recipe.path)
    result: dict[str, Any] = {
        "recipe": recipe.path,
        "run": str(run_dir),
        "utility": utility_note,
        "memory": MEMORY_NOTE,
        "budget": {
            "steps": steps,
            "batch_size": batch_size,
            "beta": beta,
            "seed": seed,
            "lrs_full": list(lrs_full),
            "lrs_lora": list(lrs_lora),
            "lora_r": 8,
        },
        "settings": {},
    }
    for name, rows in plans.items():
        chosen = rows.concepts
        log(f"[{name}] encoding")
        evals = eval_set(lm, rows, facts, recipe.eval.batch_size)
        original = evals.score(lm.model, None)
        data = encode_train_data(lm, rows.forget, rows.retain, steps, batch_size, seed)
        entry: dict[str, Any] = {"concepts": [str(c) for c in chosen], "original": original, "methods": {}}
        sauce = sauce_checkpoint(recipe, chosen, run_dir, out)
        scored = evals.score(load_model(sauce["path"], where="export").model, original["concepts"])
        entry["methods"]["SAUCE (exported)"] = {"best": {**scored, **sauce, "hparams": {}}, "sweep": []}
        log(f"[{name}] SAUCE score {scored['score']:.3f}")
        for method in methods:
            for lora, lrs in ((False, lrs_full), (True, lrs_lora)):
                sweep = []
                for lr in lrs:
                    cfg = BaselineConfig(method, lora, steps, lr, batch_size, beta, seed)  # type: ignore[arg-type]
                    (model, losses), secs, peak = measured(
                        lambda cfg=cfg, data=data: unlearn(lm.model, data, cfg)
                    )
                    point = evals.score(model, original["concepts"])
                    hp = {"lr": lr, "steps": steps, "batch_size": batch_size, "lora": lora}
                    if method == "NPO":
                        hp["beta"] = beta
                    sweep.append(
                        {
                            **point,
                            "hparams": hp,
                            "seconds": secs,
                            "peak_mb": peak,
                            "final_loss": round(losses[-1], 4),
                        }
                    )
                    log(
                        f"[{name}] {method} {'LoRA' if lora else 'full'} lr={lr:g}: score {point['score']:.3f} ({secs}s)"
                    )
                best = max(sweep, key=lambda p: p["score"])
                entry["methods"][f"{method} ({'LoRA' if lora else 'full'})"] = {"best": best, "sweep": sweep}
        result["settings"][name] = entry
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
        "(1 - forget/orig), retain/orig, interference/orig, each clipped to [0, 1]. Baselines: best of "
        f"the learning-rate sweep by score; budget {json.dumps(result['budget'])}. Memory: {result['memory']}.",
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
    return "\n".join(lines)


README_BEGIN = "<!-- compare:begin (generated by `sauce-export compare-readme`; do not edit) -->"
README_END = "<!-- compare:end -->"


def summary_markdown(result: dict[str, Any]) -> str:
    """One row per setting: SAUCE's score, the best baseline, and every baseline's full / LoRA best."""
    methods = sorted(
        {m.rsplit(" (", 1)[0] for e in result["settings"].values() for m in e["methods"]} - {"SAUCE"}
    )
    head = ["setting", "SAUCE (exported)", "best baseline", *(f"{m} full / LoRA" for m in methods)]
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
            f"{_fmt(top['score'])} ({', '.join(winners)})" if top else "-",
            *(
                " / ".join(_fmt(best.get(f"{m} ({kind})", {}).get("score")) for kind in ("full", "LoRA"))
                for m in methods
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    budget = result["budget"]
    lines += [
        "",
        f"Scores (higher is better) from `{result.get('source', 'compare.json')}`; every baseline at its "
        f"best learning rate (full {', '.join(f'{x:g}' for x in budget['lrs_full'])}; LoRA r={budget['lora_r']} "
        f"{', '.join(f'{x:g}' for x in budget['lrs_lora'])}), {budget['steps']} steps of batch "
        f"{budget['batch_size']}, NPO beta {budget['beta']:g}, seed {budget['seed']}.",
    ]
    return "\n".join(lines)


def update_readme(readme: Path, compare_json: Path) -> None:
    """Replace the text between the README's compare markers with the summary of ``compare_json``."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise InputError(str(readme), "compare markers", f"add the lines {README_BEGIN} and {README_END}")
    try:
        result = json.loads(compare_json.read_text())
        result["source"] = str(compare_json)
        table = summary_markdown(result)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(str(compare_json), "settings", f"not a compare.json ({err})") from None
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
