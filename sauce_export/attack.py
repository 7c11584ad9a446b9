"""`sauce-export attack`: is the concept really gone from an exported model?

Scores the model on the recipe's evaluation rows, then after every attack of
``evaluate/attacks.py`` (relearning, quantization, prompts, probes), against the recipe's original
model. All of the recipe's concepts are attacked together (compare's ``multi`` setting); the probes
are fitted on the validation rows only (``data.validation`` or the run's carve-out of train, which
relearning never draws from).
``gguf``: also the model through llama.cpp, quantized by its own quantizer (evaluate/gguf.py);
``caption``: also the removed persons described in words instead of shown (a world's recipe).
Writes OUT/attack.json and OUT/attack.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn

from sauce_export.compare import (
    SettingRows,
    attack_suite,
    eval_set,
    setting_rows,
    train_validation,
    utility_rows,
)
from sauce_export.data import Row, read_rows
from sauce_export.errors import InputError
from sauce_export.evaluate.attacks import AttackConfig, caption_selections, worst_attack
from sauce_export.evaluate.gguf import gguf_correctness, llama_python
from sauce_export.lm import LoadedModel, load_model
from sauce_export.recipe import Recipe


def attack(
    recipe: Recipe,
    model_path: str,
    out: Path,
    cfg: AttackConfig,
    *,
    utility: Path | None = None,
    gguf: Sequence[str] = (),
    caption: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Attack ``model_path`` (an unlearned checkpoint of ``recipe.model``); returns attack.json's content."""
    model = load_model(model_path, where="--model").model  # a bad path fails before any work
    python = llama_python() if gguf else ""  # so does a missing llama.cpp
    persons = world_persons(recipe) if caption else []  # and a recipe without a world
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
    attacked = suite.run(model, log)
    if gguf:
        runs = gguf_correctness(
            model, Path(model_path), suite.evals.encoded, gguf, out / "gguf", python=python
        )
        for q, (ok, facts) in runs.items():
            attacked["attacks"][f"gguf {q}"] = {
                **suite.evals.score_correct(ok, suite.original["concepts"]),
                **facts,
            }
            log(f"gguf {q}: score {attacked['attacks'][f'gguf {q}']['score']:.3f}")
    if caption:
        attacked["attacks"].update(
            caption_attacks(recipe, rows, eval_rows, persons, original, model, out, log)
        )
    if gguf or caption:
        attacked["worst_attack"] = worst_attack(attacked["attacks"])
        attacked["robust_score"] = attacked["attacks"][attacked["worst_attack"]]["score"]
    result = {
        "recipe": recipe.path,
        "model": model_path,
        "original_model": recipe.model,
        "concepts": [str(c) for c in concepts],
        "utility": utility_note,
        "validation": validation_note,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
        | {"gguf": list(gguf), "caption": caption},
        "original": {"plain": suite.original, "context": suite.context_original},
        "before": before,
        **attacked,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(result, indent=1))
    (out / "attack.md").write_text(markdown(result))
    return result


def world_persons(recipe: Recipe) -> list[dict[str, str]]:
    """The persons of the recipe's world (``world.json`` beside ``data.train``), which the caption
    attack describes; an InputError when there is none or no person is removed."""
    path = Path(recipe.data.train).parent / "world.json"
    if not path.is_file():
        raise InputError(str(path), "--caption", "missing: the caption attack describes the world's persons")
    if not any(c.kind == "person" for c in recipe.concepts):
        raise InputError(recipe.path, "concepts", "--caption needs a person among the removed concepts")
    persons = json.loads(path.read_text()).get("persons", [])
    if not persons or any({"name", "profession", "hometown"} - set(p) for p in persons):
        raise InputError(str(path), "persons", "--caption needs persons with name, profession and hometown")
    return persons


def caption_attacks(
    recipe: Recipe,
    rows: SettingRows,
    eval_rows: Sequence[Row],
    persons: list[dict[str, str]],
    original: LoadedModel,
    model: nn.Module,
    out: Path,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Each caption attack's score against the original model on the same prompts, whose metrics are
    kept beside it (``original``). Where the original answers none of a removed person's prompts or
    none of the others', it never learned them: there is nothing to forget, and the score is None
    (outside the robust score). A VLM's blank image is mid-grey, the size of the evaluation images."""
    blank = out / "caption-blank.png"
    facts, _ = utility_rows(recipe, None)
    chosen = caption_selections(persons, facts, rows.concepts, blank)
    if original.is_vlm:
        first = next(r.image for r in eval_rows if r.image is not None)
        out.mkdir(parents=True, exist_ok=True)
        with Image.open(first) as img:
            Image.new("RGB", img.size, (128, 128, 128)).save(blank)
    else:
        chosen = {k: v for k, v in chosen.items() if "blank" not in k}
    scored = {}
    for name, selections in chosen.items():
        if any(not sel["forget_acc"] or not sel["retain_acc"] for sel in selections.values()):
            continue  # no such rows in this world (no text fact questions)
        evals = eval_set(
            original, dataclasses.replace(rows, selections=selections), [], recipe.eval.batch_size
        )
        reference = evals.score(original.model, None)["concepts"]
        scored[name] = {**evals.score(model, reference), "original": reference}
        if any(not m["forget_acc"] or not m["retain_acc"] for m in reference.values()):
            scored[name]["score"] = None
        log(f"{name}: score {_fmt(scored[name]['score'])}")
    return scored


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
