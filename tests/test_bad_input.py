"""Every bad input named in the issue exits 2 with one line that names the file and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sauce_export.cli import main


def _recipe(tmp_path: Path, world: Path, model_dir: Path | str, **overrides: object) -> Path:
    recipe = {
        "model": str(model_dir),
        "site": "layers.1",
        "concepts": [{"kind": "person", "name": _first_person(world)}],
        "data": {"train": str(world / "train.jsonl"), "eval": str(world / "eval.jsonl")},
        "collect": {"max_rows": 40, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 1},
        "select": {"top_n": 2},
    }
    for dotted, value in overrides.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = value  # type: ignore[index]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _first_person(world: Path) -> str:
    return json.loads((world / "world.json").read_text())["persons"][0]["name"]


def _exit2(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"model": "/nonexistent/model-dir"}, ["model", "/nonexistent/model-dir"]),
        ({"model": "some-org/not-downloadable"}, ["model", "some-org/not-downloadable"]),
        ({"site": "layers.9"}, ["site", "range"]),
        ({"site": "decoder.banana"}, ["site", "unknown site"]),
        ({"concepts": [{"kind": "person", "name": "Nobody"}]}, ["concepts", "Nobody"]),
        ({"concepts": []}, ["concepts"]),
        (
            {"concepts": [{"kind": "event", "name": "concert", "clamp": 2.5}]},
            ["concepts[0].clamp", "negative"],
        ),
        ({"concepts": [{"kind": "event", "name": "concert", "top_n": 0}]}, ["concepts[0].top_n"]),
        ({"concepts": [{"kind": "event", "name": "concert", "method": "vibes"}]}, ["concepts[0].method"]),
        ({"select__surprise": 3}, ["select.surprise", "unknown key"]),
        ({"edit__scope": "everything"}, ["edit.scope"]),
        ({"collect__max_rows": "many"}, ["collect.max_rows"]),
    ],
)
def test_bad_recipe_values_exit_2(
    tmp_path: Path,
    tiny_world: Path,
    tiny_llava_dir: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, object],
    needles: list[str],
) -> None:
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, **overrides)
    out = tmp_path / "run"
    _exit2(capsys, ["--quiet", "select", str(recipe), "--out", str(out)], str(recipe), *needles)


def test_malformed_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\nsite: layers.1\n")
    _exit2(capsys, ["run", str(path), "--out", str(tmp_path / "o")], str(path), "yaml")


def test_missing_recipe_and_data_exit_2(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _exit2(capsys, ["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], "nope.yaml", "path")
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, data__train=str(tmp_path / "missing.jsonl"))
    _exit2(capsys, ["--quiet", "collect", str(recipe), "--out", str(tmp_path / "o")], "missing.jsonl", "path")


def test_malformed_data_row_names_line_and_field(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Who?", "answer": "X"}\n{"prompt": "", "answer": "Y"}\n')
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, data__train=str(data))
    _exit2(capsys, ["--quiet", "collect", str(recipe), "--out", str(tmp_path / "o")], f"{data}:2", "prompt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permissions cannot be tested")
def test_unwritable_output_exits_2(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir)
    _exit2(capsys, ["collect", str(recipe), "--out", str(locked / "run")], "output")


def test_output_that_is_a_file_exits_2(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir)
    _exit2(capsys, ["collect", str(recipe), "--out", str(target)], str(target), "output")
    _exit2(capsys, ["collect", str(recipe), "--out", str(target / "run")], "output")
