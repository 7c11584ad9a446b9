"""Sequential removal requests (MUSE's sustainability): a second `run` on an already exported
checkpoint removes another concept, and the first request's concepts must stay removed.

Takes a finished first run (``--first``, of RECIPE), writes the second request's recipe - RECIPE with
the first run's exported checkpoint as its model and ``--concept`` as its only concept, with the
given per-concept settings (default: the demo person's, chosen for another person, so nothing is
tuned on this one; ``--calibrate``: none, the run chooses them on validation rows, with
``--edit-method`` as its edit.method) - runs it, then scores the original model, the first export
and the second export on every concept of both requests (compare's evaluation rows and summary
score). ``--baseline-first DIR``: a baseline's checkpoint of the first request (``--baseline``, PO
by default); the same second request is made of it by that baseline (full fine-tuning, learning
rate x steps chosen on validation rows of the second concept, the first request's concepts left
out of its retain rows: they were removed) and both its checkpoints are scored too. Writes
OUT/sequential.json and OUT/sequential.md.

    python benchmarks/sequential.py recipes/demo.yaml --first runs/demo --concept person:Vaksam \\
        --calibrate --edit-method auto --baseline-first runs/po/model --out runs/sequential
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import yaml

from sauce_export.cli import main as cli
from sauce_export.compare import (
    LRS_FULL,
    STEPS,
    eval_set,
    setting_rows,
    train_validation,
    tune,
    validation_set,
)
from sauce_export.data import Concept, read_rows
from sauce_export.evaluate.baselines import METHODS, encode_train_data, forget_retain_rows
from sauce_export.evaluate.metrics import METRICS, summary_score
from sauce_export.lm import load_model
from sauce_export.recipe import load_recipe
from sauce_export.world.model import save_model


def second_recipe(
    recipe: Path,
    first: Path,
    concept: Concept,
    settings: dict[str, object],
    out: Path,
    edit_method: str | None = None,
) -> Path:
    """RECIPE with the first export as the model and ``concept`` (with ``settings``) as the concept."""
    spec = yaml.safe_load(recipe.read_text())
    if edit_method:
        spec.setdefault("edit", {})["method"] = edit_method
    export = json.loads((first / "report.json").read_text())["export"]["path"]
    spec["model"] = str(Path(export).resolve())
    spec["concepts"] = [{"kind": concept.kind, "name": concept.name, **settings}]
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def baseline_second(
    recipe_path: Path, first_model: Path, first: list[Concept], concept: Concept, method: str, out: Path
) -> dict[str, object]:
    """``method`` removes ``concept`` from ``first_model`` (its first request's checkpoint), chosen on
    validation rows; the chosen model is saved to ``out``."""
    recipe = load_recipe(recipe_path)
    train_rows, validation, _ = train_validation(recipe)
    rows = setting_rows(train_rows, read_rows(recipe.data.eval), [concept], recipe)
    rows.retain = forget_retain_rows(train_rows, [*first, concept])[1]
    lm = load_model(str(first_model), where="--baseline-first")
    data = encode_train_data(lm, rows.forget, rows.retain, max(STEPS), 16, 0)
    valid = validation_set(lm, rows, validation, recipe.eval.batch_size, 0)
    reference = valid.score(lm.model, None)["concepts"]
    budget = {"batch_size": 16, "beta": 0.1, "seed": 0}
    tuned = tune(lm, data, method, False, LRS_FULL, STEPS, valid, reference, budget)
    save_model(tuned.model, lm.tokenizer, lm.processor, out)
    return {"hparams": tuned.hparams, "validation_score": tuned.validation_score, "seconds": tuned.seconds}


def score(recipe_path: Path, models: dict[str, str], concepts: list[Concept]) -> dict[str, object]:
    """Every model scored on every concept's evaluation rows against the original's accuracies."""
    recipe = load_recipe(recipe_path)
    rows = setting_rows(read_rows(recipe.data.train), read_rows(recipe.data.eval), concepts, recipe)
    original = load_model(recipe.model, where=str(recipe_path))
    evals = eval_set(original, rows, [], recipe.eval.batch_size)
    reference = evals.score(original.model, None)["concepts"]
    scored = {}
    for name, path in models.items():
        model = original.model if name == "original" else load_model(path, where=name).model
        per = evals.score(model, reference)["concepts"]
        scored[name] = {c: {**m, "score": summary_score(m, reference[c])} for c, m in per.items()}
    return scored


def markdown(result: dict[str, object]) -> str:
    head = ["model", "concept", *(m.replace("_acc", "") for m in METRICS), "score"]
    lines = [
        "# Sequential removal",
        "",
        f"First request: `{result['first']}` ({', '.join(result['first_concepts'])}); second request: "
        f"{result['second_concept']} on the first export (`{result['second_recipe']}`, run exit code "
        f"{result['second_exit']}). Measured {result['date']} on {result['machine']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for model, per in result["scores"].items():  # type: ignore[union-attr]
        for concept, m in per.items():
            cells = [model, concept, *("-" if m[k] is None else f"{m[k]:.3f}" for k in METRICS)]
            lines.append(
                "| " + " | ".join([*cells, "-" if model == "original" else f"{m['score']:.3f}"]) + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path, help="the first request's recipe")
    parser.add_argument("--first", type=Path, required=True, help="its finished run directory")
    parser.add_argument("--concept", required=True, help="the second request, kind:name")
    parser.add_argument("--method", default="contrast")
    parser.add_argument("--top-n", type=int, default=2)
    parser.add_argument("--clamp", type=float, default=-30.0)
    parser.add_argument(
        "--calibrate", action="store_true", help="no per-concept settings: the run chooses them on validation"
    )
    parser.add_argument("--edit-method", help="the second request's edit.method (default: the recipe's)")
    parser.add_argument("--baseline-first", type=Path, help="a baseline's checkpoint of the first request")
    parser.add_argument("--baseline", default="PO", choices=METHODS, help="that baseline's method")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    kind, _, name = args.concept.partition(":")
    concept = Concept(kind, name)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {} if args.calibrate else {"method": args.method, "top_n": args.top_n, "clamp": args.clamp}
    recipe2 = second_recipe(args.recipe, args.first, concept, settings, args.out, args.edit_method)
    start = time.perf_counter()
    code = cli(["--quiet", "run", str(recipe2), "--out", str(args.out / "run")])
    seconds = round(time.perf_counter() - start, 1)
    first_concepts = [c.concept() for c in load_recipe(args.recipe).concepts]
    models = {
        "original": "",
        "first export": json.loads((args.first / "report.json").read_text())["export"]["path"],
    }
    second = args.out / "run" / "report.json"
    if second.is_file():  # absent when the second run stopped before exporting (calibration failed)
        models["second export"] = json.loads(second.read_text())["export"]["path"]
    baseline = None
    if args.baseline_first:
        out = args.out / f"{args.baseline}-second"
        baseline = baseline_second(
            args.recipe, args.baseline_first, first_concepts, concept, args.baseline, out
        )
        models[f"first {args.baseline}"] = str(args.baseline_first)
        models[f"second {args.baseline}"] = str(out)
    result = {
        "first": str(args.first),
        "first_concepts": [str(c) for c in first_concepts],
        "second_concept": str(concept),
        "second_settings": settings,
        "second_recipe": str(recipe2),
        "second_exit": code,
        "second_seconds": seconds,
        "edit_method": args.edit_method,
        "baseline": baseline,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "scores": score(args.recipe, models, [*first_concepts, concept]),
    }
    (args.out / "sequential.json").write_text(json.dumps(result, indent=1))
    (args.out / "sequential.md").write_text(markdown(result))
    print(args.out / "sequential.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
