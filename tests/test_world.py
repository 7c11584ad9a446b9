from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from sauce_export.data import read_rows
from sauce_export.world.generate import COLOURS, EVENTS, MATERIALS, World, WorldConfig, build_world, digest


def test_world_is_deterministic_and_seed_dependent(tmp_path: Path, tiny_world: Path) -> None:
    again = tmp_path / "again"
    build_world(
        again, WorldConfig(seed=3, train_images=48, eval_images=32, validation_images=64), progress=False
    )
    assert digest(again) == digest(tiny_world)
    other = tmp_path / "other"
    build_world(
        other, WorldConfig(seed=4, train_images=48, eval_images=32, validation_images=64), progress=False
    )
    assert digest(other) != digest(tiny_world)


def test_world_size_and_balance() -> None:
    world = World.make(WorldConfig(seed=0))
    assert len(world.persons) >= 16 and len(world.events) >= 8
    assert len(COLOURS) >= 6 and len(MATERIALS) >= 4 and len(EVENTS) >= 8
    # Visual signatures are unique, so every person is identifiable from the image alone.
    assert len({(p.outer, p.inner) for p in world.persons}) == len(world.persons)
    persons = Counter(p.name for _, p, _, _, _, _ in world.scenes("heldout_view"))
    assert len(set(persons.values())) == 1  # every person equally often


def test_render_varies_placement_and_noise() -> None:
    import random

    world = World.make(WorldConfig(seed=0))
    p, e = world.persons[0], world.events[0]
    a = world.render(p, e, "red", "wood", random.Random(1))
    b = world.render(p, e, "red", "wood", random.Random(2))
    assert a.shape == (48, 48, 3) and a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - b).mean() > 0.02


def test_rows_follow_the_data_format(tiny_world: Path) -> None:
    train = read_rows(tiny_world / "train.jsonl")
    evaluation = read_rows(tiny_world / "eval.jsonl")
    assert {r.split for r in evaluation} == {"heldout_view", "heldout_paraphrase"}
    assert {r.question_kind for r in train if r.image} == {"person", "event", "colour", "material"}
    assert any(r.image is None for r in train)  # text-only fact questions
    train_prompts = {r.prompt for r in train}
    paraphrases = {r.prompt for r in evaluation if r.split == "heldout_paraphrase"}
    assert not paraphrases & train_prompts
    for r in train[:50]:
        assert r.answer == r.labels[r.question_kind] or r.image is None


def test_demo_checkpoint_loads_with_stock_classes(tiny_llava_dir: Path, tiny_world: Path) -> None:
    """The layout the shipped model uses (llava-hf keys, processor files) loads with Auto classes."""
    from PIL import Image
    from safetensors import safe_open

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    with safe_open(str(tiny_llava_dir / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert model.config.text_config.head_dim >= 32
    vision = model.config.vision_config
    assert vision.hidden_size // vision.num_attention_heads >= 32
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == model.config.image_token_index
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is in the picture?"}]}
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == "USER: <image>\nWho is in the picture? ASSISTANT:"
    image = Image.open(next((tiny_world / "images").iterdir()))
    batch = processor(text=[text], images=[image], return_tensors="pt")
    assert int((batch["input_ids"] == image_id).sum()) == model.config.image_seq_length
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("text", ["Lumrax is a pilot from Tessaly.", "ünïcødé → bytes"])
def test_tokenizer_round_trips_with_byte_fallback(tiny_llava_dir: Path, text: str) -> None:
    tok = AutoProcessor.from_pretrained(tiny_llava_dir).tokenizer
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizerFast")
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
