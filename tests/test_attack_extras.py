"""The GGUF attack's inputs reproduce the model and a missing llama.cpp is a clear input error
(llama.cpp itself runs in tests/compat/test_gguf_attack.py, `make compat`); the caption attack asks
about the removed person, and an attack the original could not answer does not count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sauce_export.cli import main
from sauce_export.data import Concept, read_rows
from sauce_export.evaluate.attacks import caption_selections, worst_attack
from sauce_export.evaluate.gguf import gguf_job
from sauce_export.evaluate.metrics import correctness
from sauce_export.lm import batches, load_model


def test_gguf_job_feeds_the_text_model_what_torch_does(tiny_world: Path, tiny_llava_dir: Path) -> None:
    """Token embeddings with the job's image features spliced in at its image span give the full
    model's logits: llama.cpp, fed the same ids and features, computes the same function."""
    lm = load_model(str(tiny_llava_dir))
    rows = read_rows(tiny_world / "eval.jsonl")
    chosen = [r for r in rows if r.image is not None][:6] + [r for r in rows if r.image is None][:2]
    encoded = list(batches(lm, chosen, 4))
    job, feats = gguf_job(lm.model, encoded)
    assert feats is not None and len(job) == len(chosen)
    ok = correctness(lm.model, encoded)
    embed = lm.model.get_input_embeddings()
    flat = [(b, i) for b in encoded for i in range(len(b.rows))]
    for row, (batch, i) in zip(job, flat, strict=True):
        ids = torch.tensor(row["ids"])
        length = int(batch.inputs["attention_mask"][i].sum())
        assert torch.equal(ids, batch.inputs["input_ids"][i, :length])
        with torch.no_grad():
            embeds = embed(ids).clone()
            if row["image"] is not None:
                start, end, offset = row["image"]
                assert end - start == lm.model.config.image_seq_length
                embeds[start:end] = torch.from_numpy(feats[offset : offset + end - start])
            logits = lm.model(inputs_embeds=embeds[None]).logits[0]
            single = {k: v[i : i + 1, :length] for k, v in batch.inputs.items() if k != "pixel_values"}
            if "pixel_values" in batch.inputs:
                single["pixel_values"] = batch.inputs["pixel_values"][i : i + 1]
            reference = lm.model(**single).logits[0]
        assert torch.allclose(logits, reference, atol=1e-4)
        answered = all(int(logits[p].argmax()) == t for p, t in row["targets"])
        assert answered == ok[batch.rows[i].id]
        assert [p for p, _ in row["targets"]] == list(range(length - 1 - len(row["targets"]), length - 1))


def test_gguf_bad_input_exits_2_with_one_line(
    tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    base = ["--quiet", "attack", str(recipe), "--model", str(tiny_llava_dir), "--out", str(tmp_path)]
    assert main([*base, "--gguf", "q3_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gguf" in err and "q4_0" in err, err
    monkeypatch.setenv("SAUCE_LLAMA_PYTHON", str(tmp_path / "no-such-python"))
    assert main([*base, "--gguf", "q8_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gguf" in err and "make compat" in err, err
    assert not (tmp_path / "attack.json").exists()


def test_caption_rows_ask_about_the_removed_person(tiny_world: Path, tmp_path: Path) -> None:
    persons = json.loads((tiny_world / "world.json").read_text())["persons"]
    facts = [r for r in read_rows(tiny_world / "train.jsonl") if r.image is None]
    removed = Concept("person", persons[0]["name"])
    blank = tmp_path / "blank.png"
    chosen = caption_selections(persons, facts, [removed, Concept("colour", "red")], blank)
    assert set(chosen) == {"caption describe", "caption describe, blank image", "caption name"}
    for name, per in chosen.items():
        assert list(per) == [str(removed)]  # only persons are described
        sel = per[str(removed)]
        assert sel["forget_acc"] and all(removed.matches(r) for r in sel["forget_acc"])
        assert sel["retain_acc"] and not any(removed.matches(r) for r in sel["retain_acc"])
        if name.startswith("caption describe"):
            assert len(sel["retain_acc"]) == len(persons) - 1
            row = sel["forget_acc"][0]
            assert row.answer == removed.name and removed.name not in row.prompt
            assert persons[0]["profession"] in row.prompt and persons[0]["hometown"] in row.prompt
            assert (row.image == blank) == ("blank" in name)
        else:
            assert all(removed.name in r.prompt and r.answer != removed.name for r in sel["forget_acc"])
    assert worst_attack({"a": {"score": 0.5}, "b": {"score": None}, "c": {"score": 0.7}}) == "a"
