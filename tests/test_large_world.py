"""The PEBench-scale fact world (`world build --kind text --scale large`): deterministic from its
seed, splits that share no prompt, and multi-hop rows that name their person only through the
festival the person organises."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from sauce_export.cli import main as cli
from sauce_export.data import MULTIHOP_SPLIT, Concept, read_rows
from sauce_export.evaluate import attacks
from sauce_export.evaluate.metrics import metric_rows
from sauce_export.lm import load_model
from sauce_export.report import result_table
from sauce_export.world.facts import FactWorldConfig
from sauce_export.world.train import accuracy_by_kind

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "world-llama-large"


def build(out: Path, seed: int) -> Path:
    args = ["--quiet", "world", "build", "--kind", "text", "--scale", "large", "--seed", str(seed)]
    assert cli([*args, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("large") / "world", 0)


def test_large_world_is_deterministic_and_bigger_than_the_demo(world: Path, tmp_path: Path) -> None:
    a, b, c = world, build(tmp_path / "b", 0), build(tmp_path / "c", 1)
    files = ("train.jsonl", "validation.jsonl", "eval.jsonl", "world.json")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    world = json.loads((a / "world.json").read_text())
    demo = FactWorldConfig()
    assert len(world["persons"]) >= 4 * demo.persons and len(world["events"]) >= 4 * demo.events
    assert all(len(p) - 1 >= 6 for p in world["persons"])  # name + at least six attributes
    assert len({e["organiser"] for e in world["events"]}) == len(world["events"])


def test_splits_share_no_prompt_and_keep_their_roles(world: Path) -> None:
    out = world
    train, validation = read_rows(out / "train.jsonl"), read_rows(out / "validation.jsonl")
    evaluation = read_rows(out / "eval.jsonl")
    prompts = {
        name: {r.prompt for r in rows} for name, rows in (("t", train), ("v", validation), ("e", evaluation))
    }
    assert (
        not prompts["t"] & prompts["v"]
        and not prompts["t"] & prompts["e"]
        and not prompts["v"] & prompts["e"]
    )
    ids = [r.id for r in train + validation + evaluation]
    assert len(ids) == len(set(ids))
    assert {r.split for r in train} == {"train"} and {r.split for r in validation} == {"validation"}
    assert {r.split for r in evaluation} == {"heldout_view", "heldout_paraphrase", MULTIHOP_SPLIT}


def test_multi_hop_rows_reach_the_organiser_through_the_festival(world: Path) -> None:
    out = world
    world = json.loads((out / "world.json").read_text())
    persons = {p["name"]: p for p in world["persons"]}
    organiser = {e["name"]: e["organiser"] for e in world["events"]}
    evaluation = read_rows(out / "eval.jsonl")
    hops = [r for r in evaluation if r.split == MULTIHOP_SPLIT]
    assert len(hops) >= len(world["events"]) * 3
    for r in hops:
        person = organiser[r.labels["event"]]
        assert r.subject == "person" and r.labels["person"] == person
        assert r.answer == persons[person][r.question_kind]
        assert r.labels["event"] in r.prompt and person not in r.prompt
    # Trained and validated like every fact; scored apart from the direct forget questions.
    assert any("organiser of the" in r.prompt for r in read_rows(out / "validation.jsonl"))
    target = Concept("person", hops[0].labels["person"])
    selection = metric_rows(evaluation, target, "heldout_view", "heldout_paraphrase", removed=[target])
    assert {r.split for r in selection["multihop_acc"]} == {MULTIHOP_SPLIT}
    assert all(target.asked_by(r) for r in selection["multihop_acc"])
    assert all(r.split == "heldout_view" for r in selection["forget_acc"] + selection["retain_acc"])
    assert selection["interference_acc"]  # the festival's own questions involve its organiser


def test_shipped_large_model_answers_its_world(world: Path) -> None:
    """models/world-llama-large was trained on this very world (seed 0): a change to the world that
    the model was not retrained for fails here."""
    rows = random.Random(0).sample(read_rows(world / "validation.jsonl"), 480)
    rows += [r for r in read_rows(world / "eval.jsonl") if r.split == MULTIHOP_SPLIT]
    accuracy = accuracy_by_kind(load_model(str(SHIPPED)), rows)
    assert {k.split("/")[0] for k in accuracy} == {"validation", MULTIHOP_SPLIT}
    assert min(accuracy.values()) >= 0.95, accuracy


@pytest.mark.slow
def test_large_recipe_removes_an_organiser_and_its_multi_hop_route(world: Path, tmp_path: Path) -> None:
    """recipes/large.yaml end to end on the shipped model: every choice on validation rows, every
    verify gate passed, and multi-hop accuracy reported for each variant of the exported run."""
    recipe = yaml.safe_load((ROOT / "recipes" / "large.yaml").read_text())
    recipe["model"] = str(SHIPPED)
    recipe["data"] = {k: str(world / f"{k}.jsonl") for k in ("train", "validation", "eval")}
    assert set(recipe) == {"model", "concepts", "data"}
    path = tmp_path / "large.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["--quiet", "run", str(path), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["gates"]["passed"]
    metrics = report["concepts"][0]["metrics"]
    assert metrics["original"]["multihop_acc"] >= 0.9
    assert all(metrics[v]["multihop_acc"] is not None for v in ("hooked", "folded", "exported"))
    assert metrics["exported"]["multihop_acc"] <= 0.5  # not reachable through the festival either


def test_multi_hop_is_scored_as_a_prompt_attack_and_reported() -> None:
    """The multihop attack puts the multi-hop questions in forget's place (score against the
    original's multi-hop accuracy); the run's table gains the column only where the data has it."""
    original = {
        "person:P": {"forget_acc": 1.0, "retain_acc": 1.0, "interference_acc": 1.0, "multihop_acc": 1.0}
    }
    plain = {"concepts": {"person:P": {**original["person:P"], "forget_acc": 0.0, "multihop_acc": 0.5}}}
    assert attacks.paraphrased(plain, original, "multihop_acc")["score"] == pytest.approx(
        3 / 4
    )  # harmonic mean of 0.5, 1, 1
    plain["concepts"]["person:P"]["multihop_acc"] = 0.0
    assert attacks.paraphrased(plain, original, "multihop_acc")["score"] == pytest.approx(1.0)
    concept = {
        "kind": "person",
        "name": "P",
        "chance_acc": 0.125,
        "metrics": {"original": original["person:P"]},
    }
    assert "multihop_acc" in result_table({"concepts": [concept]}).splitlines()[0]
    del original["person:P"]["multihop_acc"]
    assert "multihop_acc" not in result_table({"concepts": [concept]}).splitlines()[0]
