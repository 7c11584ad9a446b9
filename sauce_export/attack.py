"""`sauce-export attack`: is the concept really gone from an exported model?

Scores the model on the recipe's evaluation rows, then after every attack of
``evaluate/attacks.py`` (relearning, quantization, prompts, probes), against the recipe's original
model. All of the recipe's concepts are attacked together (compare's ``multi`` setting); the probes
are fitted on the validation rows only (``data.validation`` or the run's carve-out of train, which
relearning never draws from).
Writes OUT/attack.json and OUT/attack.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sauce_export.compare import attack_suite, eval_set, setting_rows, train_validation, utility_rows
from sauce_export.data import read_rows
from sauce_export.evaluate.attacks import AttackConfig
from sauce_export.lm import load_model
from sauce_export.recipe import Recipe


def attack(
    recipe: Recipe,
    model_path: str,
    out: Path,
    cfg: AttackConfig,
    *,
    utility: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Attack ``model_path`` (an unlearned checkpoint of ``recipe.model``); returns attack.json's content."""
    model = load_model(model_path, where="--model").model  # a bad path fails before any work
    train_rows, validation, validation_note = train_validation(recipe)
    eval_rows = read_rows(recipe.data.eval)
    concepts = [c.concept() for c in recipe.concepts]
    rows = setting_rows(train_rows, eval_rows, concepts, recipe)
    facts, utility_note = utility_rows(recipe, utility)
    original = load_model(recipe.model, where=recipe.path)
    evals = eval_set(original, rows, facts, recipe.eval.batch_size)
    before = evals.score(model, evals.score(original.model, None)["concepts"])
    log(f"before (every evaluation row): score {before['score']:.3f}")
    suite = attack_suite(original, rows, validation, eval_rows, cfg, recipe.eval.batch_size)
    result = {
        "recipe": recipe.path,
        "model": model_path,
        "original_model": recipe.model,
        "concepts": [str(c) for c in concepts],
        "utility": utility_note,
        "validation": validation_note,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
        "original": {"plain": suite.original, "context": suite.context_original},
        "before": before,
        **suite.run(model, log),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(result, indent=1))
    (out / "attack.md").write_text(markdown(result))
    return result


def _mean(per: dict[str, dict[str, Any]], metric: str) -> float | None:
    values = [m[metric] for m in per.values() if m.get(metric) is not None]
    return sum(values) / len(values) if values else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(result: dict[str, Any]) -> str:
    """One row per attack: mean forget / generality / retain / interference over the concepts, the
    other half's accuracy after relearning, the summary score; then the probes per concept."""
    head = ["attack", "forget", "generality", "retain", "interference", "other half", "score", "lr", "s"]
    lines = [
        f"# Attacks on `{result['model']}`",
        "",
        f"Original `{result['original_model']}`, concepts {', '.join(result['concepts'])}; probes fitted on "
        f"validation rows ({result['validation']}). Score on every evaluation row {result['before']['score']:.3f}; "
        f"the attacks score all forget and generality rows and at most {result['config']['eval_rows']} retain and "
        f"interference rows per concept. Robust score (after the worst attack, "
        f"{result['worst_attack']}): **{result['robust_score']:.3f}**. Relearning rows show the learning rate that "
        "brought most back and the seconds of their whole sweep; the other half is the removed concepts' train "
        "questions that relearning did not see.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    rows: list[tuple[str, dict[str, Any]]] = [
        ("original", result["original"]["plain"]),
        ("none", result["plain"]),
    ]
    rows += list(result["attacks"].items())
    for name, p in rows:
        per = p["concepts"]
        cells = [
            name,
            *(
                _fmt(_mean(per, m))
                for m in ("forget_acc", "generality_acc", "retain_acc", "interference_acc")
            ),
            _fmt(p.get("half_acc")),
            _fmt(p.get("score")),
            "-" if "lr" not in p else f"{p['lr']:g}",
            "-" if "seconds" not in p else f"{p['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Linear probes (share of forget rows read as the concept, per layer; fitted on validation):",
        "",
    ]
    for concept, probe in result["probes"].items():
        read = ", ".join(f"{x:.2f}" for x in probe["forget_read"])
        fit = ", ".join(f"{x:.2f}" for x in probe["validation_acc"])
        orig = ", ".join(f"{x:.2f}" for x in probe["original_read"])
        lines.append(
            f"- {concept}: read {read} (max {probe['max']:.2f}; original {orig}); validation accuracy {fit}"
        )
    return "\n".join(lines) + "\n"
