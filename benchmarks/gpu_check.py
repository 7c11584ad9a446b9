"""`make gpu-check`: the demo on a CUDA device gives the CPU run's results.

Runs the demo recipe twice, ``runtime.device: cpu`` and ``cuda`` (same dtype), into OUT/cpu and
OUT/cuda, then checks that every accuracy metric of every variant agrees within 1 point and that
KL(cpu export || cuda export) on the retain prompts, each checkpoint on its own device, is at most
0.01. Writes OUT/gpu_check.json. Without CUDA it prints one skip line and exits 0: CI never needs
a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # before the package's imports: the skip costs a second, not twenty
    print("gpu-check: skipped (no CUDA device: torch.cuda.is_available() is False)")
    sys.exit(0)

from sauce_export.data import Concept, Row, read_rows
from sauce_export.evaluate.metrics import METRICS, metric_rows
from sauce_export.lm import batches, load_model
from sauce_export.pipeline import run_all
from sauce_export.recipe import Recipe, load_recipe
from sauce_export.runtime import override

MAX_POINTS = 1.0  # accuracy points (of 100) any metric may move between CPU and CUDA
MAX_KL = 0.01


def _run(recipe_path: Path, device: str, dtype: str, out: Path) -> tuple[Recipe, dict[str, Any]]:
    recipe = load_recipe(recipe_path)
    override(recipe.runtime, device, dtype)
    return recipe, run_all(recipe, out, progress=False)


def metric_gaps(cpu: dict[str, Any], cuda: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (concept, variant, metric) accuracy of both runs with its gap in points."""
    gaps = []
    for a, b in zip(cpu["concepts"], cuda["concepts"], strict=True):
        for variant, values in a["metrics"].items():
            for metric in METRICS:
                x, y = values[metric], b["metrics"][variant][metric]
                if x is not None and y is not None:
                    gaps.append(
                        {"concept": a["name"], "variant": variant, "metric": metric, "cpu": x, "cuda": y,
                         "points": round(100 * abs(x - y), 3)}
                    )  # fmt: skip
    return gaps


@torch.no_grad()
def retain_kl(cpu_dir: str, cuda_dir: str, rows: list[Row], dtype: torch.dtype, batch_size: int) -> float:
    """Mean KL(cpu || cuda) of the next-token distributions at the answer positions of ``rows``."""
    a = load_model(cpu_dir, "cpu export", dtype=dtype, device=torch.device("cpu"))
    b = load_model(cuda_dir, "cuda export", dtype=dtype, device=torch.device("cuda"))
    total, n = 0.0, 0
    for batch_a, batch_b in zip(batches(a, rows, batch_size), batches(b, rows, batch_size), strict=True):
        p = torch.log_softmax(a.model(**batch_a.inputs).logits.float(), -1)[batch_a.answer_mask]
        q = torch.log_softmax(b.model(**batch_b.inputs).logits.float(), -1)[batch_b.answer_mask].cpu()
        total += float((p.exp() * (p - q)).sum())
        n += p.shape[0]
    return total / max(n, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--dtype", default="float32", help="runtime.dtype of both runs (default float32)")
    args = parser.parse_args()
    recipe, cpu = _run(args.recipe, "cpu", args.dtype, args.out / "cpu")
    _, cuda = _run(args.recipe, "cuda", args.dtype, args.out / "cuda")
    eval_rows = read_rows(recipe.data.eval)
    concepts = [Concept(c["kind"], c["name"]) for c in cpu["concepts"]]
    retain = {
        r.id: r
        for c in concepts
        for r in metric_rows(eval_rows, c, recipe.eval.forget_split, recipe.eval.generality_split, concepts)[
            "retain_acc"
        ]
    }
    gaps = metric_gaps(cpu, cuda)
    kl = retain_kl(
        cpu["export"]["path"],
        cuda["export"]["path"],
        list(retain.values()),
        getattr(torch, args.dtype),
        recipe.eval.batch_size,
    )
    worst = max(gaps, key=lambda g: g["points"])
    passed = worst["points"] <= MAX_POINTS and kl <= MAX_KL
    result = {
        "device": torch.cuda.get_device_name(0),
        "dtype": args.dtype,
        "max_points": worst,
        "kl_cpu_cuda_retain": kl,
        "retain_rows": len(retain),
        "gates": {"points": MAX_POINTS, "kl": MAX_KL},
        "passed": passed,
        "metrics": gaps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(
        f"gpu-check: {'PASSED' if passed else 'FAILED'} on {result['device']} ({args.dtype}): largest metric gap "
        f"{worst['points']} pt ({worst['concept']} {worst['variant']} {worst['metric']}), "
        f"KL(cpu || cuda) on {len(retain)} retain prompts {kl:.2e}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
