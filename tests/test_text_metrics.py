"""Text models are first-class: fact questions *about* a person, text interference, chance per kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sauce_export.cli import main
from sauce_export.data import Concept, Row, read_rows, write_jsonl
from sauce_export.errors import InputError
from sauce_export.evaluate.metrics import chance_accuracy, metric_rows, row_correctness
from sauce_export.lm import load_model

MODELS = Path(__file__).resolve().parent.parent / "models"


def _fact(person: str, kind: str, answer: str, split: str = "heldout_view") -> Row:
    return Row(
        f"{split}_{person}_{kind}",
        f"{kind} of {person}?",
        answer,
        None,
        {"person": person},
        kind,
        split,
        "person",
    )


def _event(event: str, organiser: str, answer: str) -> Row:
    labels = {"event": event, "person": organiser}
    return Row(
        f"{event}_town", f"Where is the {event}?", answer, None, labels, "town", "heldout_view", "event"
    )


def test_a_person_concept_forgets_every_attribute_and_interference_is_text() -> None:
    rows = [
        _fact("Ana", "profession", "baker"),
        _fact("Ana", "hometown", "Vellmar"),
        _fact("Ana", "hobby", "chess", split="heldout_paraphrase"),
        _fact("Bo", "profession", "pilot"),
        _fact("Bo", "hometown", "Quenby"),
        _event("gala", "Ana", "Quenby"),  # organised by Ana, asked by the event's name
        _event("fair", "Bo", "Vellmar"),
    ]
    sel = metric_rows(rows, Concept("person", "Ana"), "heldout_view", "heldout_paraphrase")
    ids = {name: [r.id for r in chosen] for name, chosen in sel.items()}
    assert ids == {
        "forget_acc": ["heldout_view_Ana_profession", "heldout_view_Ana_hometown"],
        "generality_acc": ["heldout_paraphrase_Ana_hobby"],
        "retain_acc": ["heldout_view_Bo_profession", "heldout_view_Bo_hometown"],
        "interference_acc": ["gala_town"],
    }
    # Removing the event too: the gala question measures the event's forgetting, not interference.
    both = metric_rows(
        rows, Concept("person", "Ana"), "heldout_view", None, removed=[Concept("event", "gala")]
    )
    assert both["interference_acc"] == []


def test_image_rows_keep_image_interference() -> None:
    image = Path("x.png")
    labels = {"person": "Ana", "event": "gala"}
    rows = [
        Row("p", "Who?", "Ana", image, labels, "person", "heldout_view"),
        Row("e", "What event?", "gala", image, labels, "event", "heldout_view"),
        Row("f", "Job of Ana?", "baker", None, {"person": "Ana"}, "profession", "heldout_view"),
    ]
    sel = metric_rows(rows, Concept("person", "Ana"), "heldout_view", None)
    assert [r.id for r in sel["forget_acc"]] == ["p"]
    assert [r.id for r in sel["interference_acc"]] == ["e"]  # the text fact stays out (utility)


def test_chance_is_averaged_over_the_question_kinds() -> None:
    rows = [
        *(
            _fact(p, "profession", job)
            for p, job in zip("ABCD", ("baker", "pilot", "poet", "tailor"), strict=True)
        ),
        *(
            _fact(p, "hometown", town)
            for p, town in zip("ABCD", ("Vellmar", "Quenby", "Vellmar", "Quenby"), strict=True)
        ),
    ]
    assert chance_accuracy(rows, "person") == pytest.approx((4 * 0.25 + 4 * 0.5) / 8)
    image = [
        Row(str(i), "Who?", name, Path("x.png"), {"person": name}, "person") for i, name in enumerate("ABCDE")
    ]
    assert chance_accuracy(image, "person") == pytest.approx(0.2)


def test_about_is_read_and_checked(tmp_path: Path) -> None:
    good = {
        "prompt": "Job of Ana?",
        "answer": "baker",
        "labels": {"person": "Ana"},
        "question_kind": "profession",
    }
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{**good, "about": "person"}, good])
    about, plain = read_rows(path)
    assert (about.subject, plain.subject) == ("person", "profession")
    assert Concept("person", "Ana").asked_by(about) and not Concept("person", "Ana").asked_by(plain)
    write_jsonl(path, [{**good, "about": "event"}])
    with pytest.raises(InputError) as err:
        read_rows(path)
    assert err.value.field == "about" and str(path) in str(err.value)


def test_text_world_of_the_shipped_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world-text"
    assert main(["--quiet", "world", "build", "--kind", "text", "--out", str(out)]) == 0
    files = json.loads(capsys.readouterr().out)
    train, validation, evaluation = (read_rows(files[k]) for k in ("train", "validation", "eval"))
    assert (len(train), len(validation), len(evaluation)) == (48, 48, 96)
    assert {r.subject for r in train + validation + evaluation} == {"person"}
    held = [r for r in evaluation if r.split == "heldout_view"]
    # Nothing is chosen on evaluation rows: their wording is never in train or validation.
    assert not {r.prompt for r in held} & {r.prompt for r in train + validation}
    lm = load_model(str(MODELS / "world-llama"))
    ok = row_correctness(lm, held + validation, 96, progress=False)
    assert all(ok.values())  # the shipped model knows both wordings of every fact
    person = train[0].labels["person"]
    sel = metric_rows(evaluation, Concept("person", person), "heldout_view", "heldout_paraphrase")
    assert (len(sel["forget_acc"]), len(sel["retain_acc"]), len(sel["generality_acc"])) == (3, 45, 3)
    assert 0.125 <= chance_accuracy(evaluation, "person") < 0.2  # 1/8 per attribute, or fewer answers in use


def test_fact_world_splits_differ_by_context_and_measure_interference(tmp_path: Path) -> None:
    from sauce_export.world.facts import FactWorld, FactWorldConfig, build_fact_world

    files = build_fact_world(tmp_path / "a", FactWorldConfig(seed=5))
    again = build_fact_world(tmp_path / "b", FactWorldConfig(seed=5))
    assert all(files[k].read_bytes() == again[k].read_bytes() for k in files)
    assert (
        files["train"].read_bytes()
        != build_fact_world(tmp_path / "c", FactWorldConfig(seed=6))["train"].read_bytes()
    )
    train, validation, evaluation = (read_rows(files[k]) for k in ("train", "validation", "eval"))
    seen = {r.prompt for r in train}
    assert not {r.prompt for r in validation + evaluation} & seen  # new statements before the question
    world = FactWorld(FactWorldConfig(seed=5))
    assert len({world.organiser(e) for e in world.events}) == len(world.events)
    target = Concept("person", world.organiser(world.events[0]))
    sel = metric_rows(evaluation, target, "heldout_view", "heldout_paraphrase")
    # 4 attributes x 4 contexts; 19 other persons; the organised festival's 2 attributes x 4.
    assert {k: len(v) for k, v in sel.items()} == {
        "forget_acc": 16,
        "generality_acc": 4,
        "retain_acc": 19 * 16,
        "interference_acc": 8,
    }
    assert {r.subject for r in sel["interference_acc"]} == {"event"}
    # A statement is about another entity than the question's, so it never gives the answer away.
    for row in validation + evaluation:
        statement, _, question = row.prompt.partition(". ")
        if question:
            assert all(name not in statement for name in row.labels.values())
