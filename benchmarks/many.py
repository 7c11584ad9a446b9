"""Many removal requests at once (MUSE's scalability): 1, 4, 8, 16 concepts in one edit.

Reuses a finished run's activations and SAE (``compare``'s ``sauce_checkpoint``): for each count,
the first N concepts of the world taken in turn by kind (person, event, colour; the run's own first),
each with the run's per-concept settings for its kind, are folded and exported together, then scored
on compare's evaluation rows: mean forget / retain / interference / summary score, the number of
selected latents, the fold's rank (against vLLM's LoRA rank limit, ``--max-lora-rank``, 16 by
default and at most 512). Each of ``--baselines`` (default PO; full fine-tuning, its learning rate x
steps chosen on validation rows) is trained and scored on the same concepts. The number of latents
is the union the patch edits (the recipe's per-concept top_n, or what edit.method auto/subspace
chose on validation). Writes OUT/many.json and OUT/many.md.

    python benchmarks/many.py recipes/demo.yaml --run runs/demo --out runs/many --baselines PO,NPO
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

from sauce_export.compare import (
    eval_set,
    sauce_checkpoint,
    setting_rows,
    train_validation,
    tune,
    validation_set,
)
from sauce_export.data import Concept, read_rows
from sauce_export.evaluate.baselines import METHODS, encode_train_data
from sauce_export.evaluate.metrics import METRICS
from sauce_export.lm import load_model
from sauce_export.patch import Patch
from sauce_export.recipe import Recipe, load_recipe

VLLM_RANK_LIMIT = 16  # vLLM's default --max-lora-rank (it accepts up to 512)


def concept_order(recipe: Recipe, world: dict[str, Any]) -> list[Concept]:
    """Persons, events and colours taken in turn, the recipe's own concept of each kind first."""
    names = {
        "person": [p["name"] for p in world["persons"]],
        "event": [e["name"] for e in world["events"]],
        "colour": list(world["colours"]),
    }
    for entry in recipe.concepts:
        if entry.kind in names:
            names[entry.kind].remove(entry.name)
            names[entry.kind].insert(0, entry.name)
    out = []
    for i in range(max(map(len, names.values()))):
        out += [Concept(kind, pool[i]) for kind, pool in names.items() if i < len(pool)]
    return out


def mean(per: dict[str, dict[str, Any]], metric: str) -> float | None:
    values = [m[metric] for m in per.values() if m[metric] is not None]
    return sum(values) / len(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument(
        "--run", type=Path, required=True, help="finished run whose activations and SAE are reused"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--counts", default="1,4,8,16")
    parser.add_argument("--baselines", default="PO", help="comma list of GA, GD, KL, PO, NPO (empty: none)")
    parser.add_argument("--max-lora-rank", type=int, default=VLLM_RANK_LIMIT)
    args = parser.parse_args()
    baselines = [m for m in args.baselines.split(",") if m]
    if set(baselines) - set(METHODS):
        parser.error(f"--baselines {args.baselines!r}: use {', '.join(METHODS)}")
    recipe = load_recipe(args.recipe)
    world = json.loads((Path(recipe.data.train).parent / "world.json").read_text())
    by_kind = {e.kind: e for e in recipe.concepts}
    order = concept_order(recipe, world)
    train_rows, validation, _ = train_validation(recipe)
    eval_rows = read_rows(recipe.data.eval)
    lm = load_model(recipe.model, where=str(args.recipe))
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "recipe": str(args.recipe),
        "run": str(args.run),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "max_lora_rank": args.max_lora_rank,
        "counts": {},
    }
    for n in (int(x) for x in args.counts.split(",")):
        concepts = order[:n]
        entries = [dataclasses.replace(by_kind[c.kind], name=c.name) for c in concepts]
        sub = dataclasses.replace(recipe, concepts=entries)
        rows = setting_rows(train_rows, eval_rows, concepts, sub)
        evals = eval_set(lm, rows, [], recipe.eval.batch_size)
        original = evals.score(lm.model, None)["concepts"]
        start = time.perf_counter()
        sauce = sauce_checkpoint(sub, concepts, args.run, args.out)
        seconds = round(time.perf_counter() - start, 1)
        patch = Patch.load(Path(sauce["path"]).parent.parent / "fold" / "patch.safetensors")
        scored = evals.score(load_model(sauce["path"], where="export").model, original)
        row: dict[str, Any] = {
            "concepts": [str(c) for c in concepts],
            "latents": len(patch.description.get("features", [])) or sum(e.top_n or 0 for e in entries),
            "fold": patch.description.get("method"),
            "rank": patch.max_rank(),
            "fits_vllm": patch.max_rank() <= args.max_lora_rank,
            "sauce": {
                **{m: mean(scored["concepts"], m) for m in METRICS},
                "score": scored["score"],
                "seconds": seconds,
            },
        }
        if baselines:
            budget = {"batch_size": 16, "beta": 0.1, "seed": 0}
            data = encode_train_data(lm, rows.forget, rows.retain, 60, 16, 0)
            valid = validation_set(lm, rows, validation, recipe.eval.batch_size, 0)
            reference = valid.score(lm.model, None)["concepts"]
        for method in baselines:
            tuned = tune(lm, data, method, False, (3e-4, 1e-3), (30, 60), valid, reference, budget)
            scored = evals.score(tuned.model, original)
            row[f"{method} (full)"] = {
                **{m: mean(scored["concepts"], m) for m in METRICS},
                "score": scored["score"],
                "hparams": tuned.hparams,
                "seconds": tuned.seconds,
            }
        result["counts"][str(n)] = row
        print(
            f"{n} concepts: "
            + ", ".join(f"{k} {v['score']:.3f}" for k, v in row.items() if k == "sauce" or "(" in k)
        )
        (args.out / "many.json").write_text(json.dumps(result, indent=1))
        (args.out / "many.md").write_text(markdown(result))
    print(args.out / "many.md")
    return 0


def markdown(result: dict[str, Any]) -> str:
    head = ["concepts", "method", "latents", "fold rank", "forget", "retain", "interference", "score", "s"]
    lines = [
        "# Many concepts at once",
        "",
        f"Recipe `{result['recipe']}`, activations and SAE of `{result['run']}`; measured {result['date']} on "
        f"{result['machine']}. vLLM LoRA rank limit {result['max_lora_rank']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for n, row in result["counts"].items():
        for method in [k for k in row if k == "sauce" or k.endswith("(full)")]:
            m = row[method]
            sauce = method == "sauce"
            name = method.split()[0]
            cells = [
                n,
                "SAUCE (exported)"
                if sauce
                else f"{name} full {m['hparams']['lr']:g} x {m['hparams']['steps']}",
                str(row["latents"]) if sauce else "-",
                f"{row['rank']} ({row['fold']})" if sauce else "-",
                *(fmt(m[k]) for k in ("forget_acc", "retain_acc", "interference_acc", "score")),
                f"{m['seconds']:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
