"""Sequential removal requests (MUSE's sustainability): a second `run` on an already exported
checkpoint removes another concept, and the first request's concepts must stay removed.

Takes a finished first run (``--first``, of RECIPE), writes the second request's recipe - RECIPE with
the first run's exported checkpoint as its model and ``--concept`` as its only concept, with the
given per-concept settings (default: the demo person's, chosen for another person, so nothing is
tuned on this one; ``--calibrate``: none, the run chooses them on validation rows) - runs it, then scores the original model, the first export and the second export
on every concept of both requests (compare's evaluation rows and summary score). Writes
OUT/sequential.json and OUT/sequential.md.

    python benchmarks/sequential.py recipes/demo.yaml --first runs/demo --concept person:Vaksam \\
        --out runs/sequential
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import yaml

from sauce_export.cli import main as cli
from sauce_export.compare import eval_set, setting_rows
from sauce_export.data import Concept, read_rows
from sauce_export.evaluate.metrics import METRICS, summary_score
from sauce_export.lm import load_model
from sauce_export.recipe import load_recipe


def second_recipe(
    recipe: Path, first: Path, concept: Concept, settings: dict[str, object], out: Path
) -> Path:
    """RECIPE with the first export as the model and ``concept`` (with ``settings``) as the concept."""
    spec = yaml.safe_load(recipe.read_text())
    export = json.loads((first / "report.json").read_text())["export"]["path"]
    spec["model"] = str(Path(export).resolve())
    spec["concepts"] = [{"kind": concept.kind, "name": concept.name, **settings}]
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    kind, _, name = args.concept.partition(":")
    concept = Concept(kind, name)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {} if args.calibrate else {"method": args.method, "top_n": args.top_n, "clamp": args.clamp}
    recipe2 = second_recipe(args.recipe, args.first, concept, settings, args.out)
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
    result = {
        "first": str(args.first),
        "first_concepts": [str(c) for c in first_concepts],
        "second_concept": str(concept),
        "second_settings": settings,
        "second_recipe": str(recipe2),
        "second_exit": code,
        "second_seconds": seconds,
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
