"""The checkpoints shipped in models/ load with stock classes and know the world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sauce_export.data import read_rows
from sauce_export.evaluate.metrics import row_correctness
from sauce_export.lm import load_model
from sauce_export.world.generate import WorldConfig, build_world

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def demo_eval_rows(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # Held-out splits do not depend on the train size, so a 1-image train split rebuilds them fast.
    out = tmp_path_factory.mktemp("demo-world") / "world"
    build_world(out, WorldConfig(seed=0, train_images=1), progress=False)
    return read_rows(out / "eval.jsonl"), read_rows(out / "facts.jsonl")


def test_world_llava_is_accurate_on_held_out_views(demo_eval_rows) -> None:  # type: ignore[no-untyped-def]
    rows, _ = demo_eval_rows
    lm = load_model(str(MODELS / "world-llava"))
    assert type(lm.model).__name__ == "LlavaForConditionalGeneration"
    for kind in ("person", "event", "colour", "material"):
        chosen = [r for r in rows if r.split == "heldout_view" and r.question_kind == kind][:160]
        ok = row_correctness(lm, chosen, 80, progress=False)
        accuracy = sum(ok.values()) / len(ok)
        assert accuracy >= 0.95, (kind, accuracy)


def test_world_llama_knows_the_facts(demo_eval_rows) -> None:  # type: ignore[no-untyped-def]
    _, facts = demo_eval_rows
    lm = load_model(str(MODELS / "world-llama"))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.processor is None
    chosen = [r for r in facts if r.split == "facts"]
    ok = row_correctness(lm, chosen, 64, progress=False)
    assert sum(ok.values()) / len(ok) >= 0.95


def test_training_record_is_shipped() -> None:
    record = json.loads((MODELS / "world-models.json").read_text())
    assert record["config"]["seed"] == 0 and "world train" in record["command"]
    assert (MODELS / "world-llava" / "model.safetensors").stat().st_size < 20 * 2**20


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_recipe_removes_a_colour_from_the_shipped_model(tmp_path: Path, dtype: str) -> None:
    """The whole pipeline on the real model: selection + edit must actually remove the concept, and
    the exported checkpoint (reloaded from disk) must do what the hooked edit does - in the
    checkpoint's float32 and in bfloat16 (runtime.dtype; the export keeps the source's float32)."""
    import yaml

    from sauce_export.pipeline import run_all
    from sauce_export.recipe import load_recipe

    world = tmp_path / "world"
    build_world(world, WorldConfig(seed=0, train_images=300, eval_images=160), progress=False)
    recipe = yaml.safe_load((MODELS.parent / "recipes" / "demo.yaml").read_text())
    recipe.update(
        edit={"method": "clamp"},  # the clamp, calibrated on the carve-out (the demo uses subspace)
        model=str(MODELS / "world-llava"),
        concepts=[{"kind": "colour", "name": "red"}],
        data={"train": str(world / "train.jsonl"), "eval": str(world / "eval.jsonl")},
        runtime={"dtype": dtype},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = run_all(load_recipe(path), tmp_path / "run", progress=False)
    assert (
        json.loads((tmp_path / "run" / "collect" / "acts" / "manifest.json").read_text())["config"]["dtype"]
        == dtype
    )
    (concept,) = report["concepts"]
    original, hooked = concept["metrics"]["original"], concept["metrics"]["hooked"]
    assert original["forget_acc"] >= 0.95
    assert hooked["forget_acc"] <= concept["chance_acc"] + 0.15
    assert hooked["retain_acc"] >= 0.9 * original["retain_acc"]
    assert hooked["interference_acc"] >= 0.9 * original["interference_acc"]
    exported = concept["metrics"]["exported"]
    assert exported["forget_acc"] <= hooked["forget_acc"] + 0.1
    assert exported["retain_acc"] >= hooked["retain_acc"] - 0.03
    assert exported["kl_vs_hooked_retain"] <= 0.05
