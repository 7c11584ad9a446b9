"""The unlearning baselines do what their names say on a tiny model, and `compare` rejects bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sauce_export.cli import main
from sauce_export.compare import README_BEGIN, README_END, summary_score, utility_rows
from sauce_export.data import Concept, read_rows, write_jsonl
from sauce_export.evaluate.baselines import (
    BaselineConfig,
    TrainData,
    answer_nll,
    encode_train_data,
    forget_retain_rows,
    npo_loss,
    unlearn,
)
from sauce_export.lm import LoadedModel, load_model
from sauce_export.recipe import load_recipe
from sauce_export.world.generate import World, WorldConfig


@pytest.fixture(scope="module")
def setup(tiny_world: Path, tiny_llava_dir: Path) -> tuple[LoadedModel, TrainData, Concept]:
    person = json.loads((tiny_world / "world.json").read_text())["persons"][0]["name"]
    concept = Concept("person", person)
    lm = load_model(str(tiny_llava_dir))
    forget, retain = forget_retain_rows(read_rows(tiny_world / "train.jsonl"), [concept])
    assert forget and retain
    assert all(r.question_kind == "person" and r.answer == person for r in forget)
    assert not any(r.question_kind == "person" and r.answer == person for r in retain)
    assert all(r.image is not None for r in forget + retain)  # the world's text facts measure utility
    return lm, encode_train_data(lm, forget, retain, steps=4, batch_size=8, seed=0), concept


def _nll(model: torch.nn.Module, batch: object) -> float:
    with torch.no_grad():
        return float(answer_nll(model, batch))  # type: ignore[arg-type]


def test_one_ga_step_raises_forget_nll(setup: tuple[LoadedModel, TrainData, Concept]) -> None:
    lm, data, _ = setup
    before = _nll(lm.model, data.forget[0])
    for lora in (False, True):
        model, losses = unlearn(lm.model, data, BaselineConfig("GA", lora=lora, steps=1, lr=1e-2))
        assert losses == pytest.approx([-before], rel=1e-4)  # the loss is -NLL of the original
        assert _nll(model, data.forget[0]) > before + 0.05
    assert _nll(lm.model, data.forget[0]) == pytest.approx(before)  # the input model is untouched


def test_gd_lowers_retain_and_raises_forget_nll(setup: tuple[LoadedModel, TrainData, Concept]) -> None:
    lm, data, _ = setup
    f0, r0 = _nll(lm.model, data.forget[0]), _nll(lm.model, data.retain[0])
    model, _ = unlearn(lm.model, data, BaselineConfig("GD", steps=8, lr=3e-3))
    assert _nll(model, data.forget[0]) > f0
    assert _nll(model, data.retain[0]) < r0


def test_runs_are_deterministic_by_seed(setup: tuple[LoadedModel, TrainData, Concept]) -> None:
    lm, data, _ = setup
    cfg = BaselineConfig("NPO", lora=True, steps=2, lr=1e-3)
    (_, a), (_, b) = unlearn(lm.model, data, cfg), unlearn(lm.model, data, cfg)
    assert a == b


def test_npo_loss_matches_its_formula() -> None:
    logp, ref, beta = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -1.0]), 0.5
    # log sigmoid(-beta * log ratio) for ratios +1 and -3, by hand
    terms = [math.log(1 / (1 + math.exp(0.5 * 1.0))), math.log(1 / (1 + math.exp(0.5 * -3.0)))]
    expected = -(2 / beta) * sum(terms) / 2
    assert float(npo_loss(logp, ref, beta)) == pytest.approx(expected, rel=1e-6)
    assert float(npo_loss(ref, ref, beta)) == pytest.approx(4 * math.log(2), rel=1e-6)  # at pi == pi_ref


def test_summary_score_on_hand_made_metrics() -> None:
    orig = {"forget_acc": 1.0, "generality_acc": 1.0, "retain_acc": 0.8, "interference_acc": 1.0}
    half = {"forget_acc": 0.5, "generality_acc": 0.0, "retain_acc": 0.4, "interference_acc": 1.0}
    # terms 0.5, 0.5, 1.0 -> 3 / (2 + 2 + 1)
    assert summary_score(half, orig) == pytest.approx(0.6)
    better_than_orig = {"forget_acc": 0.0, "generality_acc": 0.0, "retain_acc": 0.9, "interference_acc": 1.0}
    assert summary_score(better_than_orig, orig) == pytest.approx(1.0)  # retain clipped to 1
    assert summary_score(orig, orig) == 0.0  # forgot nothing
    no_interference = {**half, "interference_acc": None}
    assert summary_score(no_interference, {**orig, "interference_acc": None}) == pytest.approx(0.5)


def test_compare_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    cases = [
        (["--run", str(tmp_path / "no-run")], "report.json"),
        (["--run", str(tmp_path), "--methods", "GA,XYZ"], "--methods"),
        (["--run", str(tmp_path), "--settings", "pairs"], "--settings"),
        (["--run", str(tmp_path), "--lrs-full", "fast"], "--lrs-full"),
    ]
    for extra, needle in cases:
        assert main(["--quiet", "compare", str(recipe), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert main(["compare", str(tmp_path / "missing.yaml"), "--out", str(tmp_path), "--run", "x"]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_compare_end_to_end_and_readme_table(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`compare` scores SAUCE and the baselines consistently; `compare-readme` renders what it wrote."""
    out = tmp_path / "cmp"
    argv = ["--quiet", "compare", str(tiny_run.parent / "recipe.yaml"), "--run", str(tiny_run)]
    argv += ["--out", str(out), "--settings", "single", "--methods", "GA,NPO", "--steps", "1,2"]
    assert main([*argv, "--batch-size", "4", "--lrs-full", "1e-3", "--lrs-lora", "1e-3,3e-3"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 0
    report = json.loads((tiny_run / "report.json").read_text())
    assert list(result["settings"]) == [f"single {c['kind']}:{c['name']}" for c in report["concepts"]]
    expected = {"SAUCE (exported)", "GA (full)", "GA (LoRA)", "NPO (full)", "NPO (LoRA)"}
    for entry in result["settings"].values():
        assert set(entry["methods"]) == expected
        assert len(entry["methods"]["GA (LoRA)"]["sweep"]) == 4  # 2 learning rates x 2 steps
        for method in entry["methods"].values():
            best = method["best"]
            (name,) = best["concepts"]
            want = summary_score(best["concepts"][name], entry["original"]["concepts"][name])
            assert best["score"] == pytest.approx(want) and 0.0 <= want <= 1.0
            assert best["seconds"] > 0
            if method["sweep"]:  # chosen on validation rows, never on the evaluation rows
                assert best["validation_score"] == max(p["validation_score"] for p in method["sweep"])
                chosen = {k: best["hparams"][k] for k in ("lr", "steps")}
                assert chosen in [p["hparams"] for p in method["sweep"]]
                assert not any("score" in p or "concepts" in p for p in method["sweep"])

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nstale\n{README_END}\noutro\n")
    assert main(["compare-readme", str(out / "compare.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    for name, entry in result["settings"].items():
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        baselines = [v["best"]["score"] for m, v in entry["methods"].items() if not m.startswith("SAUCE")]
        sauce = entry["methods"]["SAUCE (exported)"]["best"]["score"]
        cells = row.split(" | ")
        assert cells[1] == f"{sauce:.3f}" and cells[2].startswith(f"{max(baselines):.3f} (")
    capsys.readouterr()
    readme.write_text("no markers\n")
    assert main(["compare-readme", str(out / "compare.json"), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(readme) in err and "compare markers" in err


# ---------------------------------------------------------------------------- text-only models
WORLD_LLAMA = Path(__file__).resolve().parents[1] / "models" / "world-llama"


def _text_data(out: Path) -> tuple[Path, Path, str]:
    """(train, eval, a person) from the world ``models/world-llama`` was trained on: its text fact
    questions, each relabelled as a question about its person, so a person concept covers them all."""
    world = World.make(WorldConfig(seed=0))
    rows = [{**r, "question_kind": "person"} for r in world.fact_rows()]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [r for r in rows if r["split"] == "train"])
    write_jsonl(out / "eval.jsonl", [r for r in rows if r["split"] != "train"])
    return out / "train.jsonl", out / "eval.jsonl", world.persons[0].name


def _text_recipe(path: Path, train: Path, eval_: Path, person: str) -> Path:
    recipe = {
        "model": str(WORLD_LLAMA),
        "site": "layers.1",
        "concepts": [{"kind": "person", "name": person}],
        "data": {"train": str(train), "eval": str(eval_)},
        "collect": {"max_rows": 96, "batch_size": 48},
        "sae": {"expansion": 2, "k": 8, "epochs": 1},
        "select": {"top_n": 2},
        "eval": {
            "batch_size": 160,
            "fidelity_rows": 8,
            "forget_split": "facts",
            "generality_split": "facts_paraphrase",
        },
        "fold": {"calib_rows": 16, "refine_steps": 2},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(recipe, finished run) on the shipped text-only LlamaForCausalLM, removing one person."""
    tmp = tmp_path_factory.mktemp("text-run")
    train, eval_, person = _text_data(tmp / "data")
    recipe = _text_recipe(tmp / "recipe.yaml", train, eval_, person)
    assert main(["--quiet", "run", str(recipe), "--out", str(tmp / "run")]) in (0, 1)  # 1: a gate failed
    return recipe, tmp / "run", person


def test_compare_on_the_shipped_text_model(
    text_run: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Retain rows without images, the registry's trainable modules and LoRA targets: every method
    trains on a plain causal LM and is scored; without world facts, utility is noted as not measured."""
    recipe, run, person = text_run
    out = tmp_path / "cmp"
    argv = ["--quiet", "compare", str(recipe), "--run", str(run), "--out", str(out), "--settings", "single"]
    argv += ["--methods", "GD,PO", "--steps", "4", "--batch-size", "8", "--lrs-full", "3e-3"]
    assert main([*argv, "--lrs-lora", "1e-2"]) == 0
    result = json.loads((out / "compare.json").read_text())
    (entry,) = result["settings"].values()
    assert entry["concepts"] == [f"person:{person}"]
    original = entry["original"]["concepts"][f"person:{person}"]
    # the shipped model knows the trained facts: all of the person's and nearly all of the others'
    assert original["forget_acc"] == 1.0 and original["retain_acc"] >= 0.95
    methods = {"SAUCE (exported)", "GD (full)", "GD (LoRA)", "PO (full)", "PO (LoRA)"}
    assert set(entry["methods"]) == methods
    forgets = []
    for method in entry["methods"].values():
        best = method["best"]
        metrics = best["concepts"][f"person:{person}"]
        assert (
            best["score"] == pytest.approx(summary_score(metrics, original)) and 0.0 <= best["score"] <= 1.0
        )
        assert best["utility_acc"] is None and best["seconds"] > 0
        forgets.append(metrics["forget_acc"])
    assert min(forgets) <= 0.5  # the baselines do unlearn on a text model, not only run
    md = (out / "compare.md").read_text()
    assert result["utility"].startswith("not measured") and f"utility: {result['utility']}" in md
    for name in methods:
        (line,) = [x for x in md.splitlines() if x.startswith(f"| {name} |")]
        assert f"| {entry['methods'][name]['best']['score']:.3f} |" in line
    capsys.readouterr()


def test_utility_rows_from_a_file_or_the_world_facts(tiny_world: Path, tmp_path: Path) -> None:
    train, eval_, person = _text_data(tmp_path / "data")
    recipe = load_recipe(_text_recipe(tmp_path / "recipe.yaml", train, eval_, person))
    assert utility_rows(recipe, None) == (
        [],
        f"not measured (no {train.parent / 'facts.jsonl'} and no --utility file)",
    )
    rows, note = utility_rows(recipe, eval_)
    assert rows == read_rows(eval_) and note == f"every row of {eval_}"
    world = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, train=str(tiny_world / "train.jsonl"))
    )
    rows, note = utility_rows(world, None)
    assert rows and {r.split for r in rows} == {"facts"} and str(tiny_world / "facts.jsonl") in note


def test_compare_names_the_missing_piece_of_a_text_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No forget, retain or utility rows: one line naming the file and the field, exit 2, before any
    model is loaded (the run directory only needs its report.json)."""
    train, eval_, person = _text_data(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text("{}")

    def jsonl(path: Path, keep: Callable[[dict[str, Any]], bool], **change: str) -> Path:
        rows = [json.loads(x) for x in train.read_text().splitlines()]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, [{**r, **change} for r in rows if keep(r)])
        return path

    mine = jsonl(tmp_path / "mine.jsonl", lambda r: r["labels"]["person"] == person)
    others = jsonl(tmp_path / "others.jsonl", lambda r: r["labels"]["person"] != person)
    mine_eval = jsonl(tmp_path / "mine-eval.jsonl", lambda r: r["labels"]["person"] == person, split="facts")
    world_train = jsonl(tmp_path / "world" / "train.jsonl", lambda r: True)
    no_facts = jsonl(tmp_path / "world" / "facts.jsonl", lambda r: True, split="paraphrase")
    cases = [  # (train, eval, the file blamed, its field, what is missing)
        (mine, eval_, mine, "split", "nothing to retain"),
        (others, eval_, others, "labels", "nothing to forget"),
        (train, mine_eval, mine_eval, "labels", "nothing to retain"),
        (world_train, eval_, no_facts, "split", "utility"),
    ]
    for data_train, data_eval, blamed, field, needle in cases:
        recipe = _text_recipe(tmp_path / "recipe.yaml", data_train, data_eval, person)
        argv = ["--quiet", "compare", str(recipe), "--run", str(run), "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{blamed}: {field}: " in err and needle in err, err
    assert not (tmp_path / "o").exists()  # nothing was written: the checks come first
