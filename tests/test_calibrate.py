"""Calibration on validation rows: the carve-out, the search, its failures, and no peeking at eval."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sauce_export.calibrate import clamps_between
from sauce_export.cli import main
from sauce_export.data import hold_out, read_rows, write_jsonl


def _world_copy(tmp_path: Path, world: Path) -> Path:
    """The tiny world's JSONL files in a folder of this test's own (images shared by a link), so a
    test may hide or rewrite them."""
    out = tmp_path / "world"
    out.mkdir()
    (out / "images").symlink_to(world / "images")
    for name in ("train", "eval", "validation", "facts"):
        (out / f"{name}.jsonl").write_bytes((world / f"{name}.jsonl").read_bytes())
    (out / "world.json").write_bytes((world / "world.json").read_bytes())
    return out


def _recipe(tmp_path: Path, world: Path, model: Path, **extra: object) -> Path:
    persons = json.loads((world / "world.json").read_text())["persons"]
    recipe = {
        "model": str(model),
        "site": "layers.1",
        "concepts": [{"kind": "person", "name": persons[0]["name"]}, {"kind": "event", "name": "concert"}],
        "data": {
            "train": str(world / "train.jsonl"),
            "validation": str(world / "validation.jsonl"),
            "eval": str(world / "eval.jsonl"),
        },
        "collect": {"max_rows": 60, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 2},
        "eval": {"batch_size": 64, "fidelity_rows": 16},
        "fold": {"calib_rows": 48, "refine_steps": 2},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_hold_out_keeps_whole_images_and_covers_every_answer(tiny_world: Path) -> None:
    rows = read_rows(tiny_world / "train.jsonl")
    kept, held = hold_out(rows, 0.1)
    assert len(kept) + len(held) == len(rows) and held and kept
    assert not {r.image for r in kept if r.image} & {r.image for r in held if r.image}
    # every answer of every question kind with two or more images has validation rows
    groups = Counter((r.question_kind, r.answer) for r in rows)
    held_answers = {(r.question_kind, r.answer) for r in held}
    assert {k for k, n in groups.items() if n >= 2} <= held_answers
    assert hold_out(list(reversed(rows)), 0.1)[1] == list(reversed(held))  # not order-dependent
    assert len(hold_out(rows, 0.5)[1]) > len(held)


def test_world_validation_split_is_new_renders_with_train_wordings(tiny_world: Path) -> None:
    validation = read_rows(tiny_world / "validation.jsonl")
    train, evaluation = read_rows(tiny_world / "train.jsonl"), read_rows(tiny_world / "eval.jsonl")
    assert {r.split for r in validation} == {"validation"} and len(validation) == 64 * 4
    images = {r.image for r in validation}
    assert not images & {r.image for r in train + evaluation}
    paraphrases = {r.prompt for r in evaluation if r.split == "heldout_paraphrase"}
    assert {r.prompt for r in validation} <= {r.prompt for r in train} and not paraphrases & {
        r.prompt for r in validation
    }


def test_calibration_never_reads_the_evaluation_file(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """collect .. calibrate .. fold run with the evaluation file absent; verify then reads it."""
    world = _world_copy(tmp_path, tiny_world)
    recipe, out = _recipe(tmp_path, world, tiny_llava_dir), tmp_path / "run"
    hidden = world / "eval.hidden"
    (world / "eval.jsonl").rename(hidden)
    assert main(["--quiet", "fold", str(recipe), "--out", str(out)]) == 0
    result = json.loads((out / "calibrate" / "stage.json").read_text())["result"]
    assert result["validation"]["source"] == str(world / "validation.jsonl")
    assert result["evaluations"] > 0 and result["table"]
    # the untrained model answers nothing, so the smallest point meets every limit: one latent at 0
    for name, choice in result["choices"].items():
        assert choice["calibrated"] and (choice["top_n"], choice["clamp"], choice["size"]) == (1, 0.0, 1.0)
        (chosen,) = [e for e in result["table"] if e["concept"] == name and e["chosen"]]
        assert chosen["passed"] and chosen["forget_acc"] <= result["limits"][name]["forget_max"]
    # the union passed hooked, was folded, and the fold (reused by the fold stage) passed too
    assert [e["phase"] for e in result["table"][-2:]] == ["union", "fold"]
    assert result["table"][-1]["passed"] and result["table"][-1]["chosen"] and result["folds"] == 1
    checked, folded = (load_file(out / d / "patch.safetensors") for d in ("calibrate", "fold"))
    assert checked.keys() == folded.keys() and all(torch.equal(checked[k], folded[k]) for k in checked)
    stamp = (out / "calibrate" / "stage.json").stat().st_mtime_ns
    capsys.readouterr()

    hidden.rename(world / "eval.jsonl")
    assert main(["--quiet", "verify", str(recipe), "--out", str(out)]) in (0, 1)
    assert (out / "calibrate" / "stage.json").stat().st_mtime_ns == stamp  # not searched again
    report = json.loads((out / "report.json").read_text())
    assert set(report["machine"]) >= {"cpu", "torch", "threads"}
    assert report["calibration"]["choices"] == result["choices"]
    assert "## Calibration (validation rows only)" in (out / "report.md").read_text()
    card = (Path(report["export"]["path"]) / "README.md").read_text()
    assert "## Calibration" in card and "hooked evaluations" in card


def test_a_search_that_finds_nothing_exits_1_with_its_table(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = _world_copy(tmp_path, tiny_world)
    # a forget limit under 0 cannot be met: every point is tried and fails
    recipe = _recipe(
        tmp_path,
        world,
        tiny_llava_dir,
        calibrate={"forget_margin": 0.5, "top_n": [1, 2]},
        edit={"method": "clamp"},  # auto would go on to search the subspace patch
    )
    assert main(["--quiet", "calibrate", str(recipe), "--out", str(tmp_path / "run")]) == 1
    captured = capsys.readouterr()
    assert "| concept | phase | method |" in captured.out
    assert re.search(r"forget \d\.\d{3} > -\d", captured.out)
    assert "calibration failed: no point meets the gates" in captured.err
    failed = json.loads((tmp_path / "run" / "calibrate" / "failed.json").read_text())
    assert failed["table"] and not any(e["passed"] for e in failed["table"])
    assert {e["top_n"] for e in failed["table"]} == {1, 2} and {e["clamp"] for e in failed["table"]} <= {
        0.0,
        -10.0,
        -30.0,
        -60.0,
        -100.0,
    }
    assert not (tmp_path / "run" / "calibrate" / "stage.json").exists()


def test_a_concept_without_validation_rows_exits_1(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = _world_copy(tmp_path, tiny_world)
    rows = [json.loads(line) for line in (world / "validation.jsonl").read_text().splitlines()]
    write_jsonl(world / "validation.jsonl", [r for r in rows if r["labels"]["event"] != "concert"])
    recipe = _recipe(tmp_path, world, tiny_llava_dir)
    assert main(["--quiet", "calibrate", str(recipe), "--out", str(tmp_path / "run")]) == 1
    assert "no validation rows ask about event:concert" in capsys.readouterr().err


def test_clamps_between_grid_points() -> None:
    assert clamps_between(-30.0, -60.0, 5.0) == [-35.0, -40.0, -45.0, -50.0, -55.0, -60.0]
    assert clamps_between(0.0, -10.0, 4.0) == [-4.0, -8.0, -10.0]
    assert clamps_between(-30.0, -60.0, 0.0) == [-60.0]  # no refinement


def test_fold_check_rejects_a_fold_that_strays_from_the_hooked_edit(tmp_path: Path) -> None:
    """On the shipped world VLM: a patch equal to the hooked edit passes the fold check, one that
    breaks the site layer fails it on the retain rows (where the concept's limits alone would pass)."""
    from sauce_export.calibrate import EditSettings, FoldCheck, Point, Search, Validation
    from sauce_export.data import Concept
    from sauce_export.lm import load_model
    from sauce_export.patch import Patch, WeightDelta
    from sauce_export.sae.model import SAE, SaeConfig
    from sauce_export.world.generate import WorldConfig, build_world

    world = tmp_path / "world"
    build_world(
        world, WorldConfig(seed=0, train_images=8, eval_images=8, validation_images=48), progress=False
    )
    lm = load_model(str(Path(__file__).resolve().parents[1] / "models" / "world-llava"))
    sae = SAE(SaeConfig(d_in=128, d_sae=256, kind="topk", k=8, site="layers.2"))
    sae.reset_parameters(seed=0)
    # multiplier 1: every latent keeps its value, so the hooked edit is the original model, bit for bit
    settings = EditSettings(sae, "layers.2", 1.0, True, "all", lm.image_token_id)
    search = Search(["specific"], [1], [0.0], 5.0, 3, 3, 3, 0.0, 0.0, 1.0, 0.5, 256, 64, 0)
    red = Concept("colour", "red")
    v = Validation(lm, settings, read_rows(world / "validation.jsonl"), [red], search, progress=False)
    points = {str(red): Point("specific", 1, 0.0, (0,))}
    assert v.original[str(red)]["retain_acc"] >= 0.9 and not v.check(points, [str(red)])[0]
    check = FoldCheck(lambda edit: Patch(()), forget_slack=0.03, keep_slack=0.01)
    assert v.check_fold(points, [str(red)], Patch(()), check)[0] == []
    down = "model.language_model.layers.2.mlp.down_proj"
    gen = torch.Generator().manual_seed(0)
    broken = Patch(
        (WeightDelta(down, torch.randn(128, 4, generator=gen), torch.randn(4, 384, generator=gen)),)
    )
    fails, _ = v.check_fold(points, [str(red)], broken, check)
    assert any("folded retain" in f for f in fails), fails
