"""`make bench`: speed of the hooked reference edit and of the exported checkpoint against the
original model, as ratios.

Runs the tuned demo recipe's stages (reusing runs/demo-tuned when finished), then times, in one process and
interleaved, teacher-forced scoring and greedy generation of the original, hooked and exported
models. Writes OUT/bench.json and OUT/bench.md. Figures are ratios measured in one run on this
machine; the export benchmark (1B-shaped checkpoint) is ``benchmarks/export_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sauce_export.lm import batches, load_model
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
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-tuned.yaml"))
    parser.add_argument("--run", type=Path, default=Path("runs/demo-tuned"), help="run directory to reuse")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    run = Run(load_recipe(args.recipe), args.run, progress=False)
    lm = run.lm
    run.export()
    edit = run.edit()
    exported = load_model(str(args.run / "export" / "model"), where="bench").model
    rows = [r for r in run.eval_rows if r.image is not None][: args.rows]
    encoded = list(batches(lm, rows, 64))
    prompt = encoded[0].inputs

    def workloads(model: torch.nn.Module):  # type: ignore[no-untyped-def]
        @torch.no_grad()
        def score() -> None:
            for b in encoded:
                model(**b.inputs)

        @torch.no_grad()
        def generate() -> None:
            model.generate(
                **prompt,
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                pad_token_id=lm.padding.id,
            )

        return {"score": (score, len(rows)), "generate": (generate, prompt["input_ids"].shape[0] * 32)}

    results = {}
    for name in ("score", "generate"):
        fn, units = workloads(lm.model)[name]
        exported_fn, _ = workloads(exported)[name]
        original = hooked = exported_s = float("inf")
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
            original = min(original, _time(fn, 1))
            with edit.apply(lm.model):
                hooked = min(hooked, _time(fn, 1))
            exported_s = min(exported_s, _time(exported_fn, 1))
        results[name] = {
            "original_s": round(original, 4),
            "hooked_s": round(hooked, 4),
            "exported_s": round(exported_s, 4),
            "original_per_s": round(units / original, 1),
            "hooked_speed_ratio": round(original / hooked, 3),
            "exported_speed_ratio": round(original / exported_s, 3),
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
    lines = [
        "| workload | original /s | hooked speed (x original) | exported speed (x original) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['original_per_s']} | {r['hooked_speed_ratio']} | {r['exported_speed_ratio']} |"
        )
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in stages.items()]
    (args.out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
