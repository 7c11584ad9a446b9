"""The unlearning baselines do what their names say on a tiny model, and `compare` rejects bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sauce_export.cli import main
from sauce_export.compare import README_BEGIN, README_END, summary_score
from sauce_export.data import Concept, read_rows
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


@pytest.fixture(scope="module")
def setup(tiny_world: Path, tiny_llava_dir: Path) -> tuple[LoadedModel, TrainData, Concept]:
    person = json.loads((tiny_world / "world.json").read_text())["persons"][0]["name"]
    concept = Concept("person", person)
    lm = load_model(str(tiny_llava_dir))
    forget, retain = forget_retain_rows(read_rows(tiny_world / "train.jsonl"), [concept])
    assert forget and retain
    assert all(r.question_kind == "person" and r.answer == person for r in forget)
    assert not any(r.question_kind == "person" and r.answer == person for r in retain)
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
    argv += ["--out", str(out), "--settings", "single", "--methods", "GA,NPO", "--steps", "2"]
    assert main([*argv, "--batch-size", "4", "--lrs-full", "1e-3", "--lrs-lora", "1e-3,3e-3"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 0
    report = json.loads((tiny_run / "report.json").read_text())
    assert list(result["settings"]) == [f"single {c['kind']}:{c['name']}" for c in report["concepts"]]
    expected = {"SAUCE (exported)", "GA (full)", "GA (LoRA)", "NPO (full)", "NPO (LoRA)"}
    for entry in result["settings"].values():
        assert set(entry["methods"]) == expected
        assert len(entry["methods"]["GA (LoRA)"]["sweep"]) == 2
        for method in entry["methods"].values():
            best = method["best"]
            (name,) = best["concepts"]
            want = summary_score(best["concepts"][name], entry["original"]["concepts"][name])
            assert best["score"] == pytest.approx(want) and 0.0 <= want <= 1.0
            assert best["seconds"] > 0
            if method["sweep"]:
                assert best["score"] == max(p["score"] for p in method["sweep"])

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
