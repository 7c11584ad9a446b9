"""A corpus of malformed inputs: each exits 2 with one stderr line naming the file and the field.

Recipe values fail at load (before any model work, in the real run and in ``run --dry-run`` alike);
data, model-directory and SAE problems fail before activations are collected wherever the check
does not need them; export and convert problems fail before anything is written. DESIGN: a bad
input is a one-line answer, never a traceback, never a silent cast and never a silent exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sauce_export.cli import main
from sauce_export.patch import Patch, WeightDelta
from sauce_export.sae.formats import save_sae
from sauce_export.sae.model import SAE, SaeConfig

D_MODEL = 128  # the tiny LLaVA's language-model width (conftest)
DOWN_PROJ = "model.language_model.layers.1.mlp.down_proj"


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
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sauce-export: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------------ recipe values

RECIPE_CASES: list[tuple[dict[str, object], list[str]]] = [
    ({"model": "/nonexistent/model-dir"}, ["model", "/nonexistent/model-dir"]),
    ({"model": "some-org/not-downloadable"}, ["model", "some-org/not-downloadable"]),
    ({"model": 42}, ["model", "string"]),
    ({"site": "layers.9"}, ["site", "range"]),
    ({"site": "decoder.banana"}, ["site", "unknown site"]),
    ({"concepts": [{"kind": "person", "name": "Nobody"}]}, ["concepts", "Nobody"]),
    ({"concepts": []}, ["concepts"]),
    ({"concepts": [{"kind": "event"}]}, ["concepts[0]", "kind and name"]),
    ({"concepts": [{"kind": "event", "name": "concert", "clamp": 2.5}]}, ["concepts[0].clamp", "negative"]),
    ({"concepts": [{"kind": "event", "name": "concert", "clamp": "zero"}]}, ["concepts[0].clamp", "number"]),
    ({"concepts": [{"kind": "event", "name": "concert", "top_n": 0}]}, ["concepts[0].top_n", "at least 1"]),
    ({"concepts": [{"kind": "event", "name": "concert", "method": "vibes"}]}, ["concepts[0].method"]),
    ({"select__surprise": 3}, ["select.surprise", "unknown key"]),
    ({"select__top_n": 0}, ["select.top_n", "at least 1, got 0"]),
    ({"select__top_n": -3}, ["select.top_n", "at least 1, got -3"]),
    ({"select__top_n": None, "select__percentile": 150}, ["select.percentile", "between 0 and 100"]),
    ({"select__top_n": None}, ["select.top_n", "exactly one"]),
    ({"edit__scope": "everything"}, ["edit.scope"]),
    ({"edit__clamp": 2.0}, ["edit.clamp", "0 or negative, got 2.0"]),
    ({"edit__clamp": "zero"}, ["edit.clamp", "must be a number, got 'zero'"]),
    ({"edit__clamp": float("nan")}, ["edit.clamp", "finite"]),
    ({"edit__multiplier": float("inf")}, ["edit.multiplier", "finite"]),
    ({"collect__max_rows": "many"}, ["collect.max_rows", "integer"]),
    ({"collect__max_rows": -5}, ["collect.max_rows", "at least 1, got -5"]),
    ({"collect__max_rows": 0}, ["collect.max_rows", "at least 1, got 0"]),
    ({"collect__batch_size": 0}, ["collect.batch_size", "at least 1"]),
    ({"collect__shard_tokens": -1}, ["collect.shard_tokens", "at least 1"]),
    ({"sae__k": 0}, ["sae.k", "at least 1, got 0"]),
    ({"sae__expansion": 0}, ["sae.expansion", "at least 1"]),
    ({"sae__epochs": 0}, ["sae.epochs", "greater than 0"]),
    ({"sae__lr": -0.01}, ["sae.lr", "greater than 0"]),
    ({"sae__warmup_frac": 1.5}, ["sae.warmup_frac", "between 0 and 1"]),
    ({"sae__kind": "gelu"}, ["sae.kind", "topk"]),
    ({"sae__path": "/nonexistent/sae-dir"}, ["sae.path", "/nonexistent/sae-dir does not exist"]),
    ({"sae__allow_mismatch": "yes"}, ["sae.allow_mismatch", "true or false"]),
    ({"fold__method": "magic"}, ["fold.method"]),
    ({"fold__calib_rows": 0}, ["fold.calib_rows", "at least 2"]),
    ({"fold__refine_steps": -1}, ["fold.refine_steps", "at least 0"]),
    ({"eval__batch_size": 0}, ["eval.batch_size", "at least 1"]),
    ({"verify__max_kl_retain": -0.5}, ["verify.max_kl_retain", "at least 0"]),
    ({"runtime__dtype": "float8"}, ["runtime.dtype", "bfloat16"]),
    ({"runtime__device": "gpu"}, ["runtime.device", "cuda:N, got 'gpu'"]),
    ({"runtime__device_map": "everywhere"}, ["runtime.device_map", "auto"]),
    ({"collect__dtype": "int8"}, ["collect.dtype", "bfloat16"]),
]


@pytest.mark.parametrize(("overrides", "needles"), RECIPE_CASES)
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
    if not {"model", "site", "concepts"} & set(overrides):  # those need the model's config or the data
        assert not out.exists()  # refused at recipe load, before the run directory exists


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"select__top_n": -1}, ["select.top_n", "at least 1"]),
        ({"edit__clamp": 3.0}, ["edit.clamp", "0 or negative"]),
        ({"concepts": [{"kind": "event", "name": "concert", "clamp": 1.0}]}, ["concepts[0].clamp"]),
        ({"sae__k": 0}, ["sae.k", "at least 1"]),
        ({"sae__k": 1000}, ["sae.k", "exceeds the SAE's 256 latents (site width 128)"]),
        ({"site": "layers.7"}, ["site", "range"]),
    ],
)
def test_dry_run_validates_recipe_values(
    tmp_path: Path,
    tiny_world: Path,
    tiny_llava_dir: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, object],
    needles: list[str],
) -> None:
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, **overrides)
    _exit2(capsys, ["run", str(recipe), "--out", str(tmp_path / "o"), "--dry-run"], str(recipe), *needles)


def test_recipe_help_shows_bounds_and_the_mismatch_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe-help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "collect.max_rows (default 3000; min 1)" in "\n".join(lines)
    assert any(ln.startswith("edit.clamp (default 0.0; max 0)") for ln in lines)
    assert any(ln.startswith("sae.allow_mismatch (default False)") and "model or site" in ln for ln in lines)


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


# ------------------------------------------------------------------------------------ data (JSONL)


def _image_that_is_not(tmp: Path) -> str:
    fake = tmp / "fake.png"
    fake.write_text("this is not a PNG")
    return json.dumps({"prompt": "Who?", "answer": "X", "image": "fake.png"})


DATA_CASES: list[tuple[str, Callable[[Path], bytes], list[str]]] = [
    ("non-utf8", lambda _: b'{"prompt": "Who?", "answer": "X"}\n{"prompt": "\xff\xfe", "answer": "Y"}\n', [":2", "encoding", "UTF-8"]),
    ("bad-json", lambda _: b'{"prompt": "Who?", "answer": "X"}\n{"prompt": \n', [":2", "json"]),
    ("not-object", lambda _: b'["Who?", "X"]\n', [":1", "row", "JSON object"]),
    ("empty-prompt", lambda _: b'{"prompt": "Who?", "answer": "X"}\n{"prompt": "", "answer": "Y"}\n', [":2", "prompt"]),
    ("missing-answer", lambda _: b'{"prompt": "Who?"}\n', [":1", "answer"]),
    ("labels-list", lambda _: b'{"prompt": "Who?", "answer": "X", "labels": ["a"]}\n', [":1", "labels"]),
    ("missing-image", lambda _: b'{"prompt": "Who?", "answer": "X", "image": "nowhere.png"}\n', [":1", "image", "does not exist"]),
    ("not-an-image", lambda tmp: _image_that_is_not(tmp).encode() + b"\n", [":1", "image", "not an image"]),
    ("empty-file", lambda _: b"\n\n", ["rows", "empty"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "needles"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_names_line_and_field(
    tmp_path: Path,
    tiny_world: Path,
    tiny_llava_dir: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: Callable[[Path], bytes],
    needles: list[str],
) -> None:
    data = tmp_path / f"{name}.jsonl"
    data.write_bytes(content(tmp_path))
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, data__train=str(data))
    out = tmp_path / "o"
    _exit2(capsys, ["--quiet", "collect", str(recipe), "--out", str(out)], str(data), *needles)
    assert not (out / "collect" / "acts").exists()  # the rows are read before the model loads


def test_truncated_image_names_the_image(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PNG whose header reads but whose pixels are cut off fails when its batch is encoded."""
    source = next((tiny_world / "images").glob("*.png"))
    broken = tmp_path / "cut.png"
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Who?", "answer": "X", "image": "cut.png"}) + "\n")
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, data__train=str(data))
    _exit2(capsys, ["--quiet", "collect", str(recipe), "--out", str(tmp_path / "o")], str(broken), "image")


# ------------------------------------------------------------------------------------ model directory


def _truncate(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage_header(model: Path) -> None:
    weights = model / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(b"\xff" * 16 + blob[16:])


def _int32_down_proj(model: Path) -> None:
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, weights, metadata={"format": "pt"})


def _pickle_with_code(model: Path) -> None:
    tensors: dict[str, object] = dict(load_file(model / "model.safetensors"))
    tensors["extra"] = argparse.Namespace(payload=1)  # a global weights_only loading refuses
    torch.save(tensors, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


def _unknown_model_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "llava_from_the_future"
    (model / "config.json").write_text(json.dumps(config))


MODEL_CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("truncated", _truncate, ["model.safetensors", "header", "not fully covered"]),
    ("garbage-header", _garbage_header, ["model.safetensors", "header"]),
    ("int32-down-proj", _int32_down_proj, ["model.safetensors", "layers.1.mlp.down_proj.weight", "I32"]),
    ("pickle", _pickle_with_code, ["model", "weights_only", "argparse.Namespace"]),
    ("unknown-model-type", _unknown_model_type, ["config.json", "model_type", "llava_from_the_future"]),
    ("no-config", lambda m: (m / "config.json").unlink(), ["config.json", "missing"]),
    ("config-not-json", lambda m: (m / "config.json").write_text("{nope"), ["config.json", "config"]),
]


@pytest.mark.parametrize(("name", "damage", "needles"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_directory_in_collect(
    tmp_path: Path,
    tiny_world: Path,
    tiny_llava_dir: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    damage: Callable[[Path], None],
    needles: list[str],
) -> None:
    model = tmp_path / name
    shutil.copytree(tiny_llava_dir, model)
    damage(model)
    recipe = _recipe(tmp_path, tiny_world, model)
    _exit2(capsys, ["--quiet", "collect", str(recipe), "--out", str(tmp_path / "o")], str(model), *needles)


def test_nan_weights_refused_at_collect(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN in a weight reaches the activations: refused there, not trained into an SAE with FVU NaN."""
    model = tmp_path / "nan-model"
    shutil.copytree(tiny_llava_dir, model)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if "layers.0.mlp.down_proj" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path, tiny_world, model, collect__max_rows=8)
    _exit2(
        capsys,
        ["--quiet", "collect", str(recipe), "--out", str(tmp_path / "o")],
        str(model),
        "layers.1",
        "NaN",
    )


# ------------------------------------------------------------------------------------ SAE directory


def _sae(
    directory: Path, *, d_in: int = D_MODEL, site: str = "layers.1", model: str = "", nan: bool = False
) -> Path:
    sae = SAE(SaeConfig(d_in=d_in, d_sae=2 * d_in, k=8, site=site, model=model))
    sae.reset_parameters(seed=0)
    if nan:
        with torch.no_grad():
            sae.W_dec[3, 5] = float("nan")
    return save_sae(sae, directory)


SAE_CASES: list[tuple[str, dict[str, object] | None, dict[str, bytes], list[str]]] = [
    # (id, the SAE's config, or None for an empty directory; files then overwritten; needles)
    ("other-model", {"model": "models/world-llava"}, {}, ["model", "world-llava", "sae.allow_mismatch"]),
    ("other-site", {"site": "layers.3"}, {}, ["site", "layers.3", "sae.allow_mismatch"]),
    ("nan-weight", {"nan": True}, {}, ["W_dec", "NaN"]),
    ("not-an-sae", None, {}, ["format", "not an SAE directory"]),
    ("garbage-cfg", {}, {"cfg.json": b"{"}, ["cfg.json", "unreadable JSON"]),
    ("garbage-weights", {}, {"sae.safetensors": b"\x00" * 40}, ["sae.safetensors", "unreadable"]),
]


@pytest.mark.parametrize(("name", "sae", "files", "needles"), SAE_CASES, ids=[c[0] for c in SAE_CASES])
def test_bad_sae_directory_in_train_sae(
    tmp_path: Path,
    tiny_world: Path,
    tiny_llava_dir: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    sae: dict[str, Any] | None,
    files: dict[str, bytes],
    needles: list[str],
) -> None:
    sae_dir = tmp_path / name
    if sae is None:
        sae_dir.mkdir()
    else:
        _sae(sae_dir, **{"model": str(tiny_llava_dir), **sae})
    for file, blob in files.items():
        (sae_dir / file).write_bytes(blob)
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, sae__path=str(sae_dir))
    out = tmp_path / "o"
    _exit2(
        capsys, ["--quiet", "train-sae", str(recipe), "--out", str(out)], str(recipe), "sae.path", *needles
    )
    assert not (out / "collect").exists()  # refused before any activation is collected


def test_allow_mismatch_uses_a_foreign_sae_but_never_a_wrong_width(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sae.allow_mismatch accepts an SAE recorded for world-llava on another model; the width still counts."""
    foreign = _sae(tmp_path / "foreign", model="models/world-llava", site="layers.3")
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, sae__path=str(foreign), sae__allow_mismatch=True)
    capsys.readouterr()
    assert main(["--quiet", "train-sae", str(recipe), "--out", str(tmp_path / "run")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == str(foreign) and info["d_sae"] == 2 * D_MODEL

    narrow = _sae(tmp_path / "narrow", d_in=D_MODEL // 2, model="models/world-llava")
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, sae__path=str(narrow), sae__allow_mismatch=True)
    _exit2(
        capsys,
        ["--quiet", "train-sae", str(recipe), "--out", str(tmp_path / "run")],
        str(recipe), "sae.path", "d_in", f"width {D_MODEL // 2}",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sae", "needles"),
    [
        ({"model": "models/world-llava"}, ["model", "world-llava", "sae.allow_mismatch"]),
        ({"site": "layers.0"}, ["site", "layers.0"]),
        ({"d_in": D_MODEL // 2}, ["d_in", f"width {D_MODEL // 2}, but the site has width {D_MODEL}"]),
    ],
)
def test_dry_run_checks_the_sae(
    tmp_path: Path,
    tiny_world: Path,
    tiny_llava_dir: Path,
    capsys: pytest.CaptureFixture[str],
    sae: dict[str, Any],
    needles: list[str],
) -> None:
    """The dry run reads the sae.path SAE: its model, site and width (which the real run can only
    check after collecting) fail here."""
    sae_dir = _sae(tmp_path / "sae", **{"model": str(tiny_llava_dir), **sae})
    recipe = _recipe(tmp_path, tiny_world, tiny_llava_dir, sae__path=str(sae_dir))
    argv = ["run", str(recipe), "--out", str(tmp_path / "o"), "--dry-run"]
    _exit2(capsys, argv, str(recipe), "sae.path", str(sae_dir), *needles)
    assert not (tmp_path / "o").exists()

    allowed = _recipe(tmp_path, tiny_world, tiny_llava_dir, sae__path=str(sae_dir), sae__allow_mismatch=True)
    argv[1] = str(allowed)
    if "d_in" in sae:  # never overridden
        _exit2(capsys, argv, str(allowed), "sae.path", "d_in")
    else:
        assert main([*argv, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert (plan["sae"]["path"], plan["sae"]["d_sae"]) == (str(sae_dir), 2 * D_MODEL)


# ------------------------------------------------------------------------------------ export


def _patch(path: Path, module: str = DOWN_PROJ, rank: int = 2, nan: bool = False) -> Path:
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(D_MODEL, rank, generator=gen) * 1e-3, torch.randn(rank, 384, generator=gen)
    if nan:
        b[0, 0] = float("nan")
    Patch((WeightDelta(module, b, a),), {"method": "test"}).save(path)
    return path


def _export_case(tmp: Path, model: Path, name: str) -> tuple[list[str], list[str]]:
    """(extra export arguments, what the line must name) of one broken export; damages ``model``."""
    patch = tmp / "patch.safetensors"
    if name == "garbage-patch":
        patch.write_bytes(b"\x00\x01garbage" * 10)
        return [], [str(patch), "patch"]
    if name == "missing-patch":
        return [], [str(patch), "patch"]
    _patch(
        patch,
        module=DOWN_PROJ.replace("down_proj", "banana") if name == "unknown-module" else DOWN_PROJ,
        nan=name == "nan-patch",
    )
    if name == "nan-patch":
        return [], [str(patch), f"{DOWN_PROJ}.B", "NaN"]
    if name == "unknown-module":
        return [], ["banana"]
    if name == "truncated-source":
        _truncate(model)
        return [], [str(model / "model.safetensors"), "data", "truncated"]
    if name == "garbage-source":
        _garbage_header(model)
        return [], [str(model / "model.safetensors"), "header"]
    if name == "pickle-refused":
        _pickle_with_code(model)
        return ["--allow-pickle"], [str(model / "pytorch_model.bin"), "weights_only", "argparse.Namespace"]
    if name == "pickle-without-flag":
        _pickle_with_code(model)
        return [], [str(model), "weights", "--allow-pickle"]
    if name == "out-inside-source":
        return ["--out", str(model / "sub")], ["output", "source"]
    assert name == "out-exists"
    (tmp / "out").mkdir()
    return [], [str(tmp / "out"), "--overwrite"]


EXPORT_CASES = [
    "garbage-patch", "missing-patch", "nan-patch", "unknown-module", "truncated-source", "garbage-source",
    "pickle-refused", "pickle-without-flag", "out-inside-source", "out-exists",
]  # fmt: skip


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_bad_export_inputs(
    tmp_path: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, model)
    extra, needles = _export_case(tmp_path, model, name)
    patch, out = tmp_path / "patch.safetensors", tmp_path / "out"
    argv = ["--quiet", "export", "--patch", str(patch), "--model", str(model), "--out", str(out), *extra]
    _exit2(capsys, argv, *needles)
    assert not out.exists() or name == "out-exists"


# ------------------------------------------------------------------------------------ output target


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


# ------------------------------------------------------------------------------------ GGUF conversion

# What llama.cpp's convert_hf_to_gguf.py writes when a byte-level BPE tokenizer's hash is not in its
# list (its get_vocab_base_pre(), as logged by its "hf-to-gguf" logger; the hash is the test's own).
CONVERTER_BPE_LOG = """\
INFO:hf-to-gguf:Set model tokenizer
WARNING:hf-to-gguf:

WARNING:hf-to-gguf:**************************************************************************************
WARNING:hf-to-gguf:** WARNING: The BPE pre-tokenizer was not recognized!
WARNING:hf-to-gguf:**          There are 2 possible reasons for this:
WARNING:hf-to-gguf:**          - the model has not been added to convert_hf_to_gguf_update.py yet
WARNING:hf-to-gguf:**          - the pre-tokenization config has changed upstream
WARNING:hf-to-gguf:**          Check your model files and convert_hf_to_gguf_update.py and update them accordingly.
WARNING:hf-to-gguf:** ref:     https://github.com/ggerganov/llama.cpp/pull/6920
WARNING:hf-to-gguf:**
WARNING:hf-to-gguf:** chkhsh:  0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
WARNING:hf-to-gguf:**************************************************************************************
WARNING:hf-to-gguf:

Traceback (most recent call last):
  File "convert_hf_to_gguf.py", line 2134, in get_vocab_base_pre
    raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()
"""


def test_gguf_unknown_bpe_pre_tokenizer_is_one_line(
    tmp_path: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converter's real failure text, from a stand-in converter script (llama.cpp itself is only
    installed under ``make compat``): ``convert`` maps it to exit 2 and one line naming tokenizer.json."""
    from sauce_export.convert import LLAMA_CPP_PYTHON

    version = LLAMA_CPP_PYTHON.split("==")[1]
    tree = tmp_path / "cache" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    (tree / "gguf-py").mkdir(parents=True)
    log = tmp_path / "converter.log"
    log.write_text(CONVERTER_BPE_LOG)
    (tree / "convert_hf_to_gguf.py").write_text(
        f"import sys\nsys.stderr.write(open({str(log)!r}).read())\nsys.exit(1)\n"
    )
    monkeypatch.setenv("SAUCE_COMPAT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.gguf"
    err = _exit2(
        capsys,
        ["convert", str(tiny_llava_dir), "--format", "gguf", "--out", str(out)],
        str(tiny_llava_dir / "tokenizer.json"), "tokenizer", "BPE pre-tokenizer", "0123456789abcdef",
    )  # fmt: skip
    assert "Traceback" not in err and not out.exists()
