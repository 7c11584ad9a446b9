"""Slow: a fact world of another seed, a freshly trained text model, a recipe of only model, data
and concepts (benchmarks/generalize.py) passes every verify gate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from sauce_export.cli import main as cli

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "generalize.py"


@pytest.mark.slow
def test_fresh_text_model_passes_the_gates_with_a_plain_recipe(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generalize", SCRIPT)
    assert spec is not None and spec.loader is not None
    generalize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generalize)
    recipe, training = generalize.prepare(tmp_path, seed=2, steps=1500)
    assert min(v for k, v in training["accuracy"].items() if k.startswith("validation/")) >= 0.95
    assert set(yaml.safe_load(recipe.read_text())) == {"model", "data", "concepts"}
    assert cli(["--quiet", "run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["gates"]["passed"]
    assert report["concepts"][0]["metrics"]["exported"]["interference_acc"] is not None
