"""Shared fixtures: a tiny fictitious world and a tiny (untrained) world VLM built in the test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sauce_export.world.generate import WorldConfig, build_world

    out = tmp_path_factory.mktemp("world") / "world"
    build_world(
        out, WorldConfig(seed=3, train_images=48, eval_images=32, validation_images=64), progress=False
    )
    return out


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised model with the demo's exact architecture, tokenizer and processor."""
    from sauce_export.data import read_rows
    from sauce_export.world.generate import IMAGE_SIZE
    from sauce_export.world.model import (
        CHAT_TEMPLATE,
        build_llava,
        build_processor,
        build_tokenizer,
        save_model,
    )

    rows = read_rows(tiny_world / "train.jsonl") + read_rows(tiny_world / "eval.jsonl")
    tokenizer = build_tokenizer([f"USER: {r.prompt} ASSISTANT: {r.answer}" for r in rows], vocab_size=400)
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = build_processor(tokenizer, IMAGE_SIZE)
    model = build_llava(tokenizer, IMAGE_SIZE, seed=0)
    out = tmp_path_factory.mktemp("model") / "tiny-llava"
    save_model(model, tokenizer, processor, out)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path, tiny_llava_dir: Path) -> Path:
    """A finished `run` (a person and an event) on the tiny model; its recipe is ``../recipe.yaml``."""
    tmp = tmp_path_factory.mktemp("tiny-run")
    persons = json.loads((tiny_world / "world.json").read_text())["persons"]
    recipe = {
        "model": str(tiny_llava_dir),
        "site": "layers.1",
        "concepts": [
            {"kind": "person", "name": persons[0]["name"]},
            {"kind": "event", "name": "concert", "top_n": 2, "clamp": -5.0},
        ],
        "data": {"train": str(tiny_world / "train.jsonl"), "eval": str(tiny_world / "eval.jsonl")},
        "collect": {"max_rows": 60, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 2},
        "select": {"top_n": 3},
        "eval": {"batch_size": 64, "fidelity_rows": 16},
        "fold": {"calib_rows": 48, "refine_steps": 5},
    }
    path = tmp / "recipe.yaml"
    path.write_text("# tiny recipe: {{ not jinja }}\n" + yaml.safe_dump(recipe))
    out = tmp / "run"
    from sauce_export.cli import main

    assert main(["--quiet", "run", str(path), "--out", str(out)]) in (0, 1)
    return out


@pytest.fixture(scope="session")
def small_recipe(tiny_world: Path, tiny_llava_dir: Path) -> dict:
    """The cheapest full recipe (one concept, one SAE epoch) for tests that run `run` in a subprocess."""
    persons = json.loads((tiny_world / "world.json").read_text())["persons"]
    return {
        "model": str(tiny_llava_dir),
        "site": "layers.1",
        "concepts": [{"kind": "person", "name": persons[0]["name"]}],
        "data": {"train": str(tiny_world / "train.jsonl"), "eval": str(tiny_world / "eval.jsonl")},
        "collect": {"max_rows": 40, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 1},
        "select": {"top_n": 2},
        "eval": {"batch_size": 64, "fidelity_rows": 8},
        "fold": {"calib_rows": 24, "refine_steps": 2},
    }
