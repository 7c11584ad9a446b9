"""Sweep one concept's selection and clamp target for the hooked edit, with the recipe's other concepts.

How the demo recipe's per-concept settings were once chosen (README, "Per-concept settings"), on
the *evaluation* rows; `sauce-export calibrate` now chooses them on validation rows. For each
(score, top_n, clamp) the target concept's latents are re-selected, joined with the other concepts'
latents as the recipe selects them (each at its own target), and the hooked edit is scored on the
held-out views. Reuses a finished run's activations, SAE and selection. Prints one JSON line per
point and writes OUT/sweep-<concept>.json.

    python benchmarks/concept_sweep.py --concept event:concert --methods specific --top-n 2,4 --clamps 0,-60
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from sauce_export.edit import Edit
from sauce_export.evaluate.metrics import concept_metrics, metric_rows, row_correctness
from sauce_export.pipeline import Run, concept_scores
from sauce_export.recipe import load_recipe
from sauce_export.select import select_features, union_clamps, union_features
from sauce_export.sites import parse_site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-tuned.yaml"))
    parser.add_argument("--run", type=Path, default=Path("runs/demo-tuned"), help="finished run to reuse")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--concept", required=True, help="KIND:NAME of one of the recipe's concepts")
    parser.add_argument("--methods", default="saeuron,contrast,specific", help="comma list of scores")
    parser.add_argument("--top-n", default="2,4,8", help="comma list of feature counts")
    parser.add_argument("--clamps", default="0,-30,-60", help="comma list of clamp targets (<= 0)")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    run = Run(recipe, args.run, progress=False)
    if args.concept not in {str(c) for c in run.concepts}:
        parser.error(f"--concept {args.concept!r} is not one of {[str(c) for c in run.concepts]}")
    sae, lm, store, train = run.sae(), run.lm, run.collect(), run.sample_rows()
    rows, forget, generality = run.eval_rows, recipe.eval.forget_split, recipe.eval.generality_split
    selections = {
        str(c): metric_rows(rows, c, forget, generality, removed=run.concepts) for c in run.concepts
    }
    scored = list({r.id: r for s in selections.values() for group in s.values() for r in group}.values())
    target = next(c for c in run.concepts if str(c) == args.concept)
    selected, clamps = run.selected(), run.concept_clamps()
    points = []
    for method in args.methods.split(","):
        score = concept_scores(sae, store, train, target, method, recipe.select.tokens, recipe.path)
        for n, clamp in itertools.product(
            map(int, args.top_n.split(",")), map(float, args.clamps.split(","))
        ):
            selected[args.concept] = select_features(score, top_n=n)
            edit = Edit(
                sae=sae,
                features=tuple(union_features(selected.values())),
                site=str(parse_site(recipe.site, recipe.path)),
                clamp=tuple(union_clamps(selected, {**clamps, args.concept: clamp})),
                image_token_id=lm.image_token_id,
            )
            with edit.apply(lm.model):
                ok = row_correctness(lm, scored, recipe.eval.batch_size, progress=False)
            point = {
                "method": method,
                "top_n": n,
                "clamp": clamp,
                "features": selected[args.concept],
                "metrics": {c: concept_metrics(ok, s) for c, s in selections.items()},
            }
            print(json.dumps(point), flush=True)
            points.append(point)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sweep-{args.concept.replace(':', '-')}.json").write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
