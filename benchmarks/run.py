"""`make bench`: speed of the hooked reference edit against the original model, as ratios.

Runs the demo recipe's stages (reusing runs/demo when finished), then times, in one process and
interleaved, teacher-forced scoring and greedy generation of the original and the hooked model.
Writes OUT/bench.json and OUT/bench.md. Figures are ratios measured in one run on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sauce_export.lm import batches
from sauce_export.pipeline import Run
from sauce_export.recipe import load_recipe


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo.yaml"))
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory to reuse")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    run = Run(load_recipe(args.recipe), args.run, progress=False)
    lm = run.lm
    edit = next(iter(run.edits().values()))
    rows = [r for r in run.eval_rows if r.image is not None][: args.rows]
    encoded = list(batches(lm, rows, 64))
    prompt = encoded[0].inputs

    @torch.no_grad()
    def score() -> None:
        for b in encoded:
            lm.model(**b.inputs)

    @torch.no_grad()
    def generate() -> None:
        lm.model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)

    results = {}
    for name, fn, units in (
        ("score", score, len(rows)),
        ("generate", generate, prompt["input_ids"].shape[0] * 8),
    ):
        original = _time(fn, args.repeats)
        with edit.apply(lm.model):
            hooked = _time(fn, args.repeats)
        results[name] = {
            "original_s": round(original, 4),
            "hooked_s": round(hooked, 4),
            "original_per_s": round(units / original, 1),
            "hooked_per_s": round(units / hooked, 1),
            "hooked_speed_ratio": round(original / hooked, 3),
        }
    stages = {
        p.parent.name: json.loads(p.read_text())["seconds"] for p in sorted(args.run.glob("*/stage.json"))
    }
    report = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "rows": len(rows),
        "features": len(edit.features),
        "throughput": results,
        "stage_seconds": stages,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    lines = ["| workload | original /s | hooked /s | hooked speed (x original) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['original_per_s']} | {r['hooked_per_s']} | {r['hooked_speed_ratio']} |")
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in stages.items()]
    (args.out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
