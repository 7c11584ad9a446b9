"""Shared fixtures: a tiny fictitious world and a tiny (untrained) world VLM built in the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sauce_export.world.generate import WorldConfig, build_world

    out = tmp_path_factory.mktemp("world") / "world"
    build_world(out, WorldConfig(seed=3, train_images=48, eval_images=32), progress=False)
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
