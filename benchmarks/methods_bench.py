"""Time and peak memory of SAUCE and of each unlearning baseline, on one demo concept, in one run.

Runs `sauce-export compare` for the recipe's first concept alone at one learning rate per baseline
(the middle of compare's sweep), so every method is measured on the same process, data and budget.
SAUCE's time is its stages' wall time (collect, SAE training, select, fold, export; the first two
are reused from runs/demo-tuned and counted from their stage records); its memory is the fold + export
step's peak RSS growth. Writes OUT/methods.json and OUT/methods.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path

from sauce_export.compare import LRS_FULL, LRS_LORA, compare
from sauce_export.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-tuned.yaml"))
    parser.add_argument("--run", type=Path, default=Path("runs/demo-tuned"), help="finished demo run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    one = dataclasses.replace(recipe, concepts=recipe.concepts[:1])
    work = args.out / "methods"
    result = compare(
        one,
        work,
        args.run,
        only=("single",),
        lrs_full=LRS_FULL[1:2],
        lrs_lora=LRS_LORA[1:2],
        log=lambda _: None,
    )
    (entry,) = result["settings"].values()
    sauce = entry["methods"]["SAUCE (exported)"]["best"]["seconds"]
    rows = [
        {
            "method": name,
            "lr": v["best"]["hparams"].get("lr"),
            "seconds": v["best"]["seconds"],
            "peak_mib": v["best"]["peak_mb"],
            "time_vs_sauce": round(v["best"]["seconds"] / sauce, 3),
            "score": round(v["best"]["score"], 3),
        }
        for name, v in entry["methods"].items()
    ]
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU"
    out = {"concept": entry["concepts"][0], "machine": machine, "budget": result["budget"], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "methods.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# Method cost: removing {out['concept']} ({machine}, one run)",
        "",
        "| method | lr | wall s | time / SAUCE | peak RSS growth MiB | score |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['method']} | {r['lr'] if r['lr'] is not None else '-'} | {r['seconds']} | "
            f"{r['time_vs_sauce']} | {r['peak_mib'] if r['peak_mib'] is not None else '-'} | {r['score']} |"
            for r in rows
        ),
        "",
        "SAUCE: all stages (collect and SAE training reused from the demo run, counted from their "
        "records); its memory is the fold + export step. Baselines: "
        f"{result['budget']['steps']} steps of batch {result['budget']['batch_size']}.",
    ]
    (args.out / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
