"""The fold comparison table: every fold of the demo recipe's edit, measured against the hooked edit.

Reuses the tuned demo run's SAE and selection (runs/demo-tuned), folds the same edit with each method, and
measures each folded model (in memory; the exported checkpoint equals it, which verify checks) on
the held-out evaluation rows: PEBench accuracies next to the hooked reference's, and KL(hooked ||
folded) on forget and retain prompts, plain and with unrelated context before the question.
Writes OUT/folds.json and OUT/folds.md. The recipe's default fold is the one this table ranks best.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sauce_export.errors import InputError
from sauce_export.evaluate.metrics import concept_metrics, metric_rows, row_correctness
from sauce_export.fold import fold
from sauce_export.pipeline import Run
from sauce_export.recipe import load_recipe
from sauce_export.verify import Variant, fidelity_report, fidelity_sets

FOLDS: dict[str, dict[str, Any]] = {
    "projection, writers of layers 0..L + embeddings": {"method": "projection"},
    "projection, writers of layer L only": {
        "method": "projection",
        "first_layer": -1,
        "include_embed": False,
    },
    "lora on down_proj, ridge closed form": {
        "method": "lora",
        "modules": ["mlp.down_proj"],
        "refine_steps": 0,
    },
    "lora on down_proj, ridge + KL refinement": {"method": "lora", "modules": ["mlp.down_proj"]},
    "lora on o_proj + down_proj, ridge closed form": {"method": "lora", "refine_steps": 0},
    "lora on o_proj + down_proj, ridge + KL (default)": {"method": "lora"},
    "gated MLP neurons, least-squares init": {"method": "gated", "refine_steps": 0},
    "gated MLP neurons, + KL refinement": {"method": "gated"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-tuned.yaml"))
    parser.add_argument("--run", type=Path, default=Path("runs/demo-tuned"), help="run directory to reuse")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--fidelity-rows", type=int, default=128)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    run = Run(recipe, args.run, progress=False)
    lm, edit, rows, concepts = run.lm, run.edit(), run.eval_rows, run.concepts
    layer = int(edit.site.split(".")[1])
    selections = {
        str(c): metric_rows(rows, c, recipe.eval.forget_split, recipe.eval.generality_split, removed=concepts)
        for c in concepts
    }
    scored = list({r.id: r for sel in selections.values() for group in sel.values() for r in group}.values())
    with edit.apply(lm.model):
        hooked_ok = row_correctness(lm, scored, recipe.eval.batch_size, progress=False)
    hooked = Variant("hooked", lm.model, lambda: edit.apply(lm.model))
    sets = {
        str(c): fidelity_sets(rows, c, concepts, recipe.eval.forget_split, args.fidelity_rows, 0)
        for c in concepts
    }
    results = []
    for name, overrides in FOLDS.items():
        if overrides.get("first_layer") == -1:
            overrides = {**overrides, "first_layer": layer}
        cfg = replace(recipe.fold, **overrides)
        start = time.perf_counter()
        try:
            patch = fold(lm, edit, run.train_rows, concepts, cfg, progress=False)
        except InputError as err:  # a fold that cannot express this edit (gated: a negative clamp)
            results.append({"fold": name, "config": overrides, "not_applicable": err.problem})
            print(f"{name}: not applicable: {err}", flush=True)
            continue
        seconds = time.perf_counter() - start
        with patch.apply(lm.model):
            folded_ok = row_correctness(lm, scored, recipe.eval.batch_size, progress=False)
        folded = Variant(name, lm.model, lambda patch=patch: patch.apply(lm.model))
        per_concept = {}
        for c in concepts:
            fid = fidelity_report(
                lm, hooked, folded, sets[str(c)], edit, recipe.eval.batch_size, progress=False
            )
            per_concept[str(c)] = {
                "folded": concept_metrics(folded_ok, selections[str(c)]),
                "hooked": concept_metrics(hooked_ok, selections[str(c)]),
                **fid,
            }
        results.append(
            {"fold": name, "config": overrides, "seconds": round(seconds, 2), "concepts": per_concept}
        )
        print(f"{name}: {seconds:.1f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "folds.json").write_text(json.dumps(results, indent=1))
    (args.out / "folds.md").write_text(markdown(results) + "\n")
    print(markdown(results))


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per (fold, concept): folded vs hooked accuracy, KL vs hooked, fit time."""
    head = (
        "| fold | concept | forget (hooked) | retain (hooked) | interference (hooked) | KL forget | KL retain "
        "| KL forget ctx | KL retain ctx | top-1 agree | fit s |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        if "not_applicable" in r:
            lines.append(f"| {r['fold']} | all | not applicable: {r['not_applicable']} |" + " |" * 8)
            continue
        for concept, m in r["concepts"].items():
            f, h = m["folded"], m["hooked"]
            cells = [
                f"{f[k]:.3f} ({h[k]:.3f})" if f[k] is not None else "-"
                for k in ("forget_acc", "retain_acc", "interference_acc")
            ]
            kls = [
                f"{m[k]:.4f}"
                for k in (
                    "kl_vs_hooked_forget",
                    "kl_vs_hooked_retain",
                    "kl_vs_hooked_forget_ctx",
                    "kl_vs_hooked_retain_ctx",
                )
            ]
            lines.append(
                f"| {r['fold']} | {concept} | {' | '.join(cells)} | {' | '.join(kls)} "
                f"| {m['top1_agree_vs_hooked']:.3f} | {r['seconds']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
